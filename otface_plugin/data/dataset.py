"""mxnet-free equivalent of the recipe's ``MXFaceDataset`` (same indexing, same tensors)."""
from __future__ import annotations

import numbers
import os
from typing import Callable, Optional, Tuple

import numpy as np

from otface_plugin.data.errors import ImageDecodeError, RecordIOError
from otface_plugin.data.imagecodec import decode_image
from otface_plugin.data.recordio import MXIndexedRecordIO, unpack

__all__ = ["RecordFaceDataset", "read_image_record"]


def read_image_record(reader: MXIndexedRecordIO, key: int) -> Tuple[float, np.ndarray]:
    """(label, RGB uint8 HxWx3) of record ``key``, decoded as ``mx.image.imdecode`` would.
    Errors name the file and the record."""
    try:
        header, payload = unpack(reader.read_idx(key))
        img = decode_image(payload)
    except ImageDecodeError as e:
        raise ImageDecodeError(f"{reader.uri}: record {key} is not an image: {e}") from None
    except RecordIOError as e:
        msg = str(e)
        raise RecordIOError(msg if reader.uri in msg else f"{reader.uri}: record {key}: {msg}"
                            ) from None
    label = header.label
    if not isinstance(label, numbers.Number):
        label = label[0]
    return float(label), img


class RecordFaceDataset:
    """``root_dir/train.rec`` + ``train.idx`` as (CHW float tensor in [-1, 1], long label).

    Dataset position ``i`` reads record ``imgidx[i]`` exactly like ``MXFaceDataset``, so a
    :class:`~otface_plugin.data.PKSampler` built on the same file yields valid indices. Training
    transform as upstream: random horizontal flip, then ``(x / 255 - 0.5) / 0.5``.
    """

    def __init__(self, root_dir: str, train: bool = True,
                 transform: Optional[Callable] = None):
        self.root_dir = root_dir
        self.reader = MXIndexedRecordIO(os.path.join(root_dir, "train.idx"),
                                        os.path.join(root_dir, "train.rec"), "r")
        header, _ = unpack(self.reader.read_idx(0))
        if header.flag > 0:
            self.header0 = (int(header.label[0]), int(header.label[1]))
            self.imgidx = np.arange(1, int(header.label[0]), dtype=np.int64)
        else:
            self.imgidx = np.asarray(self.reader.keys, dtype=np.int64)
        self.train = train
        self.transform = transform

    def __len__(self) -> int:
        return len(self.imgidx)

    def __getitem__(self, index: int):
        import torch

        label, img = read_image_record(self.reader, int(self.imgidx[index]))
        if self.transform is not None:
            return self.transform(img), torch.tensor(label, dtype=torch.long)
        # torch's RNG, like torchvision's flip, so the recipe's worker_init_fn seeds it
        if self.train and torch.rand(1).item() < 0.5:
            img = img[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
        return x.div_(255).sub_(0.5).div_(0.5), torch.tensor(label, dtype=torch.long)
