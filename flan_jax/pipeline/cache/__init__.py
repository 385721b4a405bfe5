"""A preprocessed cache of registry tasks: written by an Apache Beam job (`build`), read through Grain
(`grain_input`); `format` is the layout both agree on."""
