"""`laten analyze` (docs/method.md §11): why transfer fails, as numbers and figures.

  cka.py         linear CKA: the full-sample formula, the unbiased minibatch estimator from
                 U-centred Grams, its accumulator, and how alignment sits on the heatmap
  side.py        one model seen by the analysis: Grams of its module outputs at answer tokens,
                 per-example attribution scores, weight deltas against its own weights
  parametric.py  cosines of injected deltas with the target's weights (LaTen merges, LoRA merges)
  neurons.py     top-K neuron stability across examples (Jaccard), delta norm per layer
  report.py      the whole analysis (pair or study), analysis.json, analysis.md and the PNGs
"""
