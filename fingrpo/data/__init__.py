"""FinQA data: records, loading and prompts (:mod:`fingrpo.data.finqa`); validation
(:mod:`fingrpo.data.validate`, imported on use: it pulls in Great Expectations)."""

from fingrpo.data.finqa import (
    FinQAQA,
    FinQARecord,
    PromptExample,
    linearize_table,
    load_provenance,
    load_split,
    make_examples,
    random_subset_ids,
    render_prompt,
)

__all__ = [
    "FinQAQA",
    "FinQARecord",
    "PromptExample",
    "linearize_table",
    "load_provenance",
    "load_split",
    "make_examples",
    "random_subset_ids",
    "render_prompt",
]
