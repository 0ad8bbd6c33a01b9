"""Fine-tune a ResNet on your own images: a torchvision, timm or Hugging Face model, started
from its pretrained weights, trained further on an ImageFolder (one folder per class).

The classifier is replaced for the folder's classes (their names, sorted, become the
labels). Training uses ImageNet-style augmentation at the model's input size
(RandomResizedCrop + horizontal flip); validation uses the model's own eval transform
(resize, centre crop, mean and std), the one the export writes into the model card. SGD or
AdamW, with the pretrained layers at a fraction of the classifier's learning rate
(--backbone-lr-scale), optionally frozen batch norms (--freeze-bn), and mixed precision on
a CUDA GPU. Like python -m export.train it writes last.pt (--resume), best.pt, metrics.csv
and curve.png to --out; best.pt exports as is, labels and preprocessing included:

    python -m export.finetune resnet50 --weights IMAGENET1K_V2 --data photos/train \\
        --val-data photos/val --out runs/pets            (the weights need the network once)
    python -m export resnet50 --checkpoint runs/pets/best.pt --out models --name pets

SOURCE is what python -m export takes: resnet18..resnet152, wide_resnet50_2,
resnext50_32x4d (--weights: a torchvision weights name), cifar-resnet<6n+2>, timm/<name>
(--weights: a pretrained tag), or a Hub folder (timm or transformers, as `hf download`
leaves it; offline). --init starts from any checkpoint the export reads instead.
"""

# By job: cli (the flags and exit status), folders (the classes, images and validation
# split), images (augmentation, eval transform, loaders), network (the source, its starting
# weights, the new classifier), run (optimizer, schedule, checkpoint contents). The epoch
# loop, checkpoints and reports are export.train's.
