"""Prefect flows over the fingrpo library: ``flows/retrain.py`` (the flow) and ``flows/deploy.py``
(its cron deployment). The library itself never imports Prefect."""
