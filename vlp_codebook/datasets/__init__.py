"""Datasets registered in vlp_codebook.registry.DATASETS."""
from vlp_codebook.datasets.caption_text import clean_caption, swap_left_right
from vlp_codebook.datasets.collate import vlp_collate
from vlp_codebook.datasets.image_loading import load_image
from vlp_codebook.datasets.json_caption import (CaptionPretrainDataset, CaptionRetrievalDataset,
                                                load_annotations)
from vlp_codebook.datasets.synthetic_shapes import SyntheticShapesDataset

__all__ = ['clean_caption', 'swap_left_right', 'vlp_collate', 'load_image', 'load_annotations',
           'CaptionPretrainDataset', 'CaptionRetrievalDataset', 'SyntheticShapesDataset']
