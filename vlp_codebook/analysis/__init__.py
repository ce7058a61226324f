"""Analysis tools: Grad-CAM of the image-text matching score on the fusion encoder's cross-attention."""
from vlp_codebook.analysis.gradcam import itm_gradcam

__all__ = ['itm_gradcam']
