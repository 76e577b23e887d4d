"""EfficientAD (Batzner, Heckler, König, WACV 2024; docs/method.md): the training objective (`losses`), teacher
and map normalisation (`normalization`), the pure train step (`train_step`), the run on the shared engine
(`trainer`) and the one inference path (`inference`). Its config is `efficientad_jax.config.Config`; its networks
are in `efficientad_jax.models`."""
