"""Training and verification data: InsightFace .rec/.idx record files and .bin pair sets, image folders, the
SynthFace generator, packing, and the training loader. Names are imported on first use (see faceforge.exports)."""

from faceforge.exports import lazy_exports

_HOMES = {
    "FACE_SIZE": "faceforge.data.images", "decode_image": "faceforge.data.images", "to_unit_range": "faceforge.data.images",
    "FaceImages": "faceforge.data.record_dataset", "RecordDataset": "faceforge.data.record_dataset",
    "ImageFolderDataset": "faceforge.data.folder",
    "RecordReader": "faceforge.data.recordio", "RecordWriter": "faceforge.data.recordio",
    "IRHeader": "faceforge.data.recordio", "write_insightface_set": "faceforge.data.recordio",
    "load_bin": "faceforge.data.binsets", "write_bin": "faceforge.data.binsets",
    "TrainLoader": "faceforge.data.loader", "load_into_memory": "faceforge.data.loader",
    "pack_folder": "faceforge.data.pack", "pack_pairs": "faceforge.data.pack",
    "align_face": "faceforge.data.align",
    "generate_ijb": "faceforge.data.synthface_ijb",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
