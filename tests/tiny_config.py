"""CPU-tiny pipeline settings shared by the flow tests (tiny images, 1 epoch, few episodes)."""

TINY = [
    "runtime.n_workers=2", "runtime.progress=false",
    "data.synthetic.images=40", "data.synthetic.classes=4", "data.synthetic.size=64",
    "extract.long_side=64", "extract.shard_size=16", "extract.ssl.epochs=1", "extract.ssl.image_size=48",
    "cluster.num_clusters=8", "train.epochs=1", "train.image_size=65", "train.hidden=32", "train.ffn=64",
    "train.heads=4", "train.fg_prototypes=4", "train.bg_prototypes=8", "train.batch_size=4",
    "evaluate.folds=[0]", "evaluate.shots=[1]", "evaluate.seeds=[0]", "evaluate.episodes=6", "evaluate.overlays=1",
]
