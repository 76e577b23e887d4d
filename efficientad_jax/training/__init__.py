"""The training machinery every method shares: the engine and its run directory (`engine`), resumable
checkpoints (`checkpoint`), data parallelism over devices and hosts (`parallel`), the optimizer (`optim`),
calibration on validation normals (`calibration`), XLA compiler options (`compiler`) and sweeps of many runs
(`sweep`)."""
