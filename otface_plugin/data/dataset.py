"""mxnet-free equivalent of the recipe's ``MXFaceDataset`` (same indexing, same tensors)."""
from __future__ import annotations

import numbers
import os
from typing import Callable, Optional, Tuple

import numpy as np

from otface_plugin.data.errors import ImageDecodeError, RecordIOError
from otface_plugin.data.imagecodec import decode_image
from otface_plugin.data.layout import check_label, class_bound, dataset_record_ids, header_range
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
    return float(label), img  # a missing key raised MissingRecordError naming the .idx


class RecordFaceDataset:
    """``root_dir/train.rec`` + ``train.idx`` as (CHW float tensor in [-1, 1], long label).

    Dataset position ``i`` reads record ``imgidx[i]`` exactly like ``MXFaceDataset``, so a
    :class:`~otface_plugin.data.PKSampler` built on the same file yields valid indices. Training
    transform as upstream: random horizontal flip, then ``(x / 255 - 0.5) / 0.5``.

    Unlike ``MXFaceDataset`` it refuses, with errors naming the file and the record: an ``.idx``
    that does not cover the ``.rec`` or lacks records of ``imgidx`` (checked on open), and a
    label that is not a class id in ``[0, num_classes)`` (checked per item), ``num_classes``
    being the header's identity count or the ``property`` file's, whichever is smaller.
    """

    def __init__(self, root_dir: str, train: bool = True,
                 transform: Optional[Callable] = None):
        self.root_dir = root_dir
        rec = os.path.join(root_dir, "train.rec")
        self.reader = MXIndexedRecordIO(os.path.join(root_dir, "train.idx"), rec, "r")
        self.reader.check_coverage()
        head = header_range(self.reader)
        if head is not None:
            self.header0 = head
        self.imgidx = dataset_record_ids(self.reader, head)
        self.bound = class_bound(rec, head)
        self.train = train
        self.transform = transform

    def __len__(self) -> int:
        return len(self.imgidx)

    def __getitem__(self, index: int):
        import torch

        key = int(self.imgidx[index])
        label, img = read_image_record(self.reader, key)
        label = check_label(label, self.bound, self.reader.uri, key, index)
        if self.transform is not None:
            return self.transform(img), torch.tensor(label, dtype=torch.long)
        # torch's RNG, like torchvision's flip, so the recipe's worker_init_fn seeds it
        if self.train and torch.rand(1).item() < 0.5:
            img = img[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
        return x.div_(255).sub_(0.5).div_(0.5), torch.tensor(label, dtype=torch.long)
