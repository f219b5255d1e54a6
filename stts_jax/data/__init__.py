"""Video data: decoding, Molmo2 preprocessing, prompts, manifests, TFDS, Grain pipelines, default dataset.

Modules (import them directly; this package imports nothing heavy on its own):
  video            `sample_frames(path, max_frames, max_fps) -> (frames uint8 [T,H,W,3], timestamps f32 [T])`
  preprocess       Molmo2-exact resize, patchify [T,P,588], pooling index, normalise
  tokenizer        `load_tokenizer(tokenizer.json)`, the default dataset's word-level tokenizer
  prompt           `PromptBuilder` (Molmo2 layout + ChatML + answer), `pad_for_training`
  manifest         JSONL manifests (`read_manifest`, `write_manifest`, `Example`)
  tfds_builder     manifest -> ArrayRecord (`build`, `data_source`)
  pipeline         Grain pipelines: `train_iterator`, `eval_iterator` -> `DataIterator` of static-shape batches
  config           `DataConfig` (the `data` config section)
  default_dataset  the offline default dataset (`build`, `data_config`); `synth` renders its clips
  oracle           event-window keep rates of heuristic vs random pruning
  throughput       frames/s benchmarks
"""
