"""Document functions of the offline lmms-eval test tasks (see matvlm_synth.yaml).

A document: {"id", "question", "answer", "choices": [str], "answer_index": int, "images": [image, ...]}
with 0, 1 or 2 images, stored as a parquet file with image bytes (like the lmms-lab benchmark sets).
"""


def doc_to_visual(doc):
    return [image.convert("RGB") for image in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_choice(doc):
    return list(doc["choices"])


def doc_to_target_index(doc):
    return int(doc["answer_index"])


def process_results(doc, results):
    prediction = results[0].strip().lower()
    return {"exact_match": float(prediction == doc["answer"].strip().lower())}
