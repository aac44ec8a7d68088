#!/usr/bin/env python3
"""Convert a torch legacy (pre-1.6, non-zip) checkpoint to safetensors without torch.

The legacy format is: pickled magic number, pickled protocol version (1001), pickled
system info, the pickled state dict (tensors as torch._utils._rebuild_tensor_v2 calls over
persistent-id storages), a pickled list of storage keys, then per key an int64 element
count followed by the raw little-endian bytes. Only an allow-list of globals is resolved,
so a hostile file cannot execute code. Usage: pth_to_safetensors.py IN.pth OUT.safetensors
"""
import array
import collections
import io
import json
import pickle
import struct
import sys

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL = 1001

# storage class name -> (safetensors dtype, element size)
STORAGES = {
    "FloatStorage": ("F32", 4),
    "DoubleStorage": ("F64", 8),
    "HalfStorage": ("F16", 2),
    "LongStorage": ("I64", 8),
    "IntStorage": ("I32", 4),
    "ByteStorage": ("U8", 1),
}


class StorageType:
    def __init__(self, name):
        self.name = name


class TensorRef:
    def __init__(self, storage_key, offset, size, stride):
        self.storage_key, self.offset, self.size, self.stride = storage_key, offset, tuple(size), tuple(stride)


def rebuild_tensor_v2(storage, offset, size, stride, *_rest):
    return TensorRef(storage, offset, size, stride)


class LegacyUnpickler(pickle.Unpickler):
    def __init__(self, f, storages):
        super().__init__(f, encoding="latin1")
        self.storages = storages

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return rebuild_tensor_v2
        if module == "torch" and name in STORAGES:
            return StorageType(name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        self.storages[key] = (storage_type.name, numel)
        return key


FORMATS = {"F32": "f", "F64": "d", "F16": "e", "I64": "q", "I32": "i", "U8": "B"}


def strided_bytes(storage, dtype, offset, size, stride):
    """Gather a tensor's elements in row-major order. The Lite checkpoints were converted
    from TensorFlow and keep its HWIO memory layout behind permuted strides."""
    flat = memoryview(storage).cast(FORMATS[dtype])
    index = [offset]
    for s, st in zip(size, stride):
        index = [i + k * st for i in index for k in range(s)]
    return array.array(FORMATS[dtype], (flat[i] for i in index)).tobytes()


def convert(src, dst):
    with open(src, "rb") as f:
        data = f.read()
    f = io.BytesIO(data)
    if pickle.load(f) != MAGIC:
        sys.exit(f"{src}: not a legacy torch checkpoint (bad magic number)")
    if pickle.load(f) != PROTOCOL:
        sys.exit(f"{src}: unsupported legacy protocol version")
    pickle.load(f)  # system info
    storages = {}
    state = LegacyUnpickler(f, storages).load()
    keys = pickle.load(f)
    raw = {}
    for key in keys:
        (count,) = struct.unpack("<q", f.read(8))
        dtype_name, _ = storages[key]
        elem = STORAGES[dtype_name][1]
        raw[key] = f.read(count * elem)
        if len(raw[key]) != count * elem:
            sys.exit(f"{src}: truncated storage {key}")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    header, blobs, pos = {}, [], 0
    for name, t in state.items():
        if not isinstance(t, TensorRef):
            continue
        dtype, elem = STORAGES[storages[t.storage_key][0]]
        numel = 1
        for s in t.size:
            numel *= s
        blob = strided_bytes(raw[t.storage_key], dtype, t.offset, t.size, t.stride)
        header[name] = {"dtype": dtype, "shape": list(t.size), "data_offsets": [pos, pos + len(blob)]}
        blobs.append(blob)
        pos += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * ((8 - len(head) % 8) % 8)
    with open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(head)))
        out.write(head)
        for b in blobs:
            out.write(b)
    print(f"{dst}: {len(header)} tensors", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    convert(sys.argv[1], sys.argv[2])
