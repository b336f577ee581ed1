"""Vehicle part parser (docs/method.md §1): smp U-Net factory, training, batched mask prediction."""
