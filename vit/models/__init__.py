"""The networks: the ViT (timm-compatible weights), its dense trunk for detection and segmentation
(ViTDet), and the detection and segmentation heads. Imports only torch, torchvision and vit.errors."""
