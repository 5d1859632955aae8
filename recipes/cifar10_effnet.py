"""CIFAR-10 from TFDS, fine-tuning an ImageNet-pretrained EfficientNetV2-B0.

    kcls recipe run cifar10_effnet
    kcls recipe run cifar10_effnet --set data.data_dir=/data/tfds
    kcls recipe run cifar10_effnet --set data.source=folder:../shared/data/cifar10_train_10k \
        --set model.weights=none

Data: TFDS `cifar10` (50,000 train / 10,000 test images, 32x32), upscaled to 128x128
for the backbone; 10% of the training split is held out for validation. The first run
downloads and prepares it through TFDS (`data.download=auto`), into `data.data_dir`
(default `~/tensorflow_datasets`); `--set data.download=never` refuses instead.

Model: EfficientNetV2-B0 with the KerasCV ImageNet preset (downloaded once, then
cached; `--set model.weights=DIR` reads a preset folder copied from a machine that has
it). Offline, the run stops before training with a message naming what could not be
fetched and the overrides that avoid it.

Schedule: 2 epochs training the head on the frozen backbone, then 8 epochs of the
whole network (BatchNorm frozen) at a 10x lower learning rate, XLA, and mixed
precision where the accelerator supports it.

Expected: ~96% test accuracy on a single modern GPU (not measured on this project's
CPU-only machines).
"""

from kcls.config import DataConfig, ExportConfig, ModelConfig, Recipe, TrainConfig


def get_config() -> Recipe:
    return Recipe(
        name="cifar10_effnet",
        description=__doc__.splitlines()[0],
        data=DataConfig(
            source="tfds:cifar10",
            image_size=128,
            batch_size=128,
            augment="randaugment",
            horizontal_flip=True,
        ),
        model=ModelConfig(backbone="efficientnetv2_b0", weights="imagenet", dropout=0.2),
        train=TrainConfig(
            frozen_epochs=2,
            unfrozen_epochs=8,
            learning_rate=1e-3,
            unfrozen_lr_factor=0.1,
            weight_decay=1e-4,
            label_smoothing=0.1,
        ),
        export=ExportConfig(base_dir="saved_models", top_k=5),
    )
