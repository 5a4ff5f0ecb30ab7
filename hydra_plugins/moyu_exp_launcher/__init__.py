"""moyu_exp's Hydra launchers (see :mod:`hydra_plugins.moyu_exp_launcher.launcher`)."""
