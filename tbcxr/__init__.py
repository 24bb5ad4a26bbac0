"""Shared code of the two TB chest X-ray scripts, one module per concern.

    errors        TbcxrError and its kinds: what the library raises (a script prints the message, exits 1)
    config        class names, run profiles (full / transfer learning), dataclass -> argparse flags
    train_config  the trainer's TrainConfig (one field per flag) and how a run's config is layered
    runtime       device, autocast dtype, seeding, peak memory; torchrun shards and gathers
    decoding      image file -> 8-bit greyscale picture
    layout        folder layouts (organized or raw Kaggle): which files are images of which class
    data          data preparation, transforms, datasets, samplers, loaders
    split         the split manifest; held-out selection: which images a checkpoint may be scored on
    data_quality  unreadable-file scan, exact and near-duplicate leak check
    cache         decoded uint8 caches: fingerprints, worker-process decoding, .npy rows, stale-file cleanup
    fast_data     batches read from the decoded caches, batched augmentation on the device
    progress      progress bars on a terminal, plain lines and stage summaries in a log file
    model         ResNet50 weights, build_model, optimizer groups, inference
    checkpoint    atomic writes, JSON, the typed Checkpoint: load, save, operating point, profile, model
    training      one run: what trains it (Training) and what changes as it goes (Run), checkpoints, summary
    metrics       metrics, bootstrap, operating points, P(TB) and its calibration
    evaluation    --test-only: scoring, reports, intervals, where the operating points came from
    comparison    --compare: two checkpoints on the same images, the paired test
    figures       every plot, one save helper
    tracking      MLflow: store choice, runs, offline queue, artifact logging
    model_registry  MLflow model logging: the pt2 model, the servable pyfunc registered in the Model Registry
    demo          synthetic X-rays for --demo
    lungs         the shipped lung-field model (MONAI U-Net): lung masks, the lung box and its margin
    lung_training  training the lung-field model: python -m tbcxr.lung_training

Nothing runs at import time; MLflow, scikit-learn, matplotlib and MONAI are imported where used.
"""
