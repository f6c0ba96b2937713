"""Data: COCO datasets (pycocotools), the resumable distributed sampler, device prefetching, and the
embedded synthetic dataset (``python -m megdet_hpc.data.synthetic``)."""
