"""Analysis tools.

* :mod:`.gradcam` -- Grad-CAM of the image-text matching score on the fusion encoder's
  cross-attention, per text token; :mod:`.gradcam_figure` draws the maps (overlay, labelled
  grid); :mod:`.pointing` scores where they peak on synthetic-shapes scenes.
* :mod:`.scalars`, :mod:`.plots`, :mod:`.codebook_health`, :mod:`.gallery` -- pictures of a
  training run (losses, retrieval R@k, codebook health, a retrieval gallery), drawn by
  ``TrainingPlotsHook`` and ``python -m vlp_codebook.tools.plot``.
"""
from vlp_codebook.analysis.gradcam import itm_gradcam

__all__ = ['itm_gradcam']
