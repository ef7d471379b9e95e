"""Using frozen features: k-NN and linear evaluation, feature extraction, pictures.

- `dinojax.eval.knn`: `knn_classify` (official weighted k-NN vote, jittable, sharded) and
  `knn_eval` (model + datasets -> top-1/top-5), `python -m dinojax.eval.knn`.
- `dinojax.eval.linear`: official linear-eval features, the released `linear` / `linear4` heads
  (and DINO v1 heads), `linear_eval`, `python -m dinojax.eval.linear`;
  `dinojax.eval.probe`: the grid of linear probes trained in one jitted loop;
  `dinojax.eval.linear_features`: the official linear-eval input recipe both of them use.
- `dinojax.eval.extract`: CLS / patch / intermediate-layer features to `.npy`,
  `python -m dinojax.eval.extract`.
- `dinojax.eval.pictures`: patch-feature PCA and attention-map PNGs,
  `python -m dinojax.eval.pictures`.
- `dinojax.eval.retrieval`: revisited Oxford / Paris `compute_map`, exact sharded top-k `search`,
  retrieval descriptors, `python -m dinojax.eval.retrieval`.
- `dinojax.eval.video`: DAVIS-2017 label propagation and the J / F metrics,
  `python -m dinojax.eval.video`.
- `dinojax.eval.features` (sharded batched extraction over any data source) and
  `dinojax.eval.transforms` (the official eval transform) underneath.
"""
