"""Teacher distillation (docs/method.md §8): a PDN teacher regresses WideResNet-101-2 features on ImageNet. Its
config (`config`), the ImageNet stream (`stream`), the pure step and target (`train_step`) and the run on the
shared engine (`trainer`, which writes the teacher folder EfficientAD loads)."""
