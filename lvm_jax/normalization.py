"""The per-channel mean and std (0..1 units) that image models are trained with: one home for the numbers the
input pipeline (data.normalize presets), the checkpoint preprocessors (weights/preprocessing.py) and RandAugment's
fill colour all use."""

IMAGENET_DEFAULT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # timm's, and most torchvision-era models
IMAGENET_STANDARD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # "inception": big_vision, the ViT releases
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
