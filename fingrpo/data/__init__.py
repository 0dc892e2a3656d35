"""The datasets, one module per job: FinQA records and loading (:mod:`fingrpo.data.finqa`), prompts and
retrieval (:mod:`fingrpo.data.prompts`), TAT-QA converted to FinQA-shaped records
(:mod:`fingrpo.data.tatqa`), several datasets in one config (:mod:`fingrpo.data.sources`) and the
validation suite (:mod:`fingrpo.data.validate`, which pulls in Great Expectations when it runs).

Nothing is imported here, so a stage that reads records does not depend on the prompt code (its
``dvc.yaml`` deps stay its own): import from the modules.
"""
