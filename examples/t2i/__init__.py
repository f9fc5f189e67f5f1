"""The text-to-image lab: a text-conditioned NTM (or the flow-matching baseline on the same backbone), trained
on local text-image data through the library's :class:`~trajflow.train.Trainer`.

Scripts (run from the repository root): ``train.py``, ``sample.py``, ``distill.py``, ``evaluate.py``; the runs
are JSON files in ``configs/``. The modules beside them, in the order a run uses them:

* ``config.py``: :class:`~examples.t2i.config.T2IConfig` and its sections (data, model, text, train, sample);
* ``text.py``: the frozen text encoder (MiniLM, or the hashing stand-in of the tests);
* ``vae.py``: the optional latent space of a local diffusers ``AutoencoderKL``;
* ``data/``: the text-image data sets, and the one a config names;
* ``model.py``: the network a config builds, an NTM initialised from a flow-matching run (NTM §3.3), and a
  trained model ready to sample (training checkpoints and pretrained folders);
* ``objective.py``: the Trainer's objective (caption -> text features -> loss on the image);
* ``sampling.py``: the sampling paths (raw, full, fast) and PNG grids;
* ``evaluation/``: the compositional score of the shapes data and the Fréchet features, with the readers
  trained once and cached (``evaluate.py`` and ``benchmarks/t2i.py`` use them).

Nothing here is imported on ``import examples.t2i``: import the module you need.
"""
