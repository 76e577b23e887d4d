"""Weights and files: the torch-free `.pth` reader (`pth`), network weights from and to PyTorch state dicts and
teacher folders (`weights`), the dataset and weight downloads (`download`) and their HTTP transfer, checksums
and extraction (`transfer`)."""
