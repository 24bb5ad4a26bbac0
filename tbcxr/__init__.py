"""Shared code of the two TB chest X-ray scripts, one module per concern.

    config        class names, run profiles (full / transfer learning), dataclass -> argparse flags
    runtime       device, autocast dtype, seeding, peak memory; torchrun shards and gathers
    decoding      image file -> 8-bit greyscale picture
    data          layouts, split manifest, held-out samples, transforms, datasets, samplers, loaders
    data_quality  unreadable-file scan, exact and near-duplicate leak check
    fast_data     decoded uint8 cache, batched augmentation on the device
    progress      progress bars on a terminal, plain lines and stage summaries in a log file
    model         ResNet50 weights, build_model, optimizer groups, inference
    checkpoint    atomic writes, JSON, the checkpoint format, load and rebuild
    metrics       metrics, bootstrap, operating points, temperature, calibration
    evaluation    --test-only and --compare: scoring, reports, the paired test
    figures       every plot, one save helper
    tracking      MLflow: store choice, runs, offline queue, model logging
    demo          synthetic X-rays for --demo

Nothing runs at import time; MLflow, scikit-learn and matplotlib are imported where used.
"""
