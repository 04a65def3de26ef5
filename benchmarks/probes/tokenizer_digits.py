# Usage: python benchmarks/probes/tokenizer_digits.py (needs runs/world, the shipped teacher and runs/v4_teacher).
# Session 8: how three tokenizers cut the held-out OCR answers and recall records: the shipped one (one token per digit),
# teacher_v2's (digit groups of 3, BPE keeps only the frequent ones) and groups of 2 with all_digit_groups.
import json, re, time
from transformers import AutoTokenizer
from matvlm.data.tokenizer import train_tokenizer
from matvlm.teacher import conversation_texts
train = json.load(open("runs/world/train.json")); test = json.load(open("runs/world/test.json"))
t0 = time.time()
new = train_tokenizer(conversation_texts(train), vocab_size=2048, template="phi_short", digit_group=2, all_digit_groups=True)
print(f"trained in {time.time() - t0:.0f} s")

ocr = [r["answers"][0] for r in test if r["family"] == "ocr"]
nums = [m for a in ocr for m in re.findall(r"\d+", a)]
words = [w for a in ocr for w in re.findall(r"[a-z]+", a)]
recall = [r for r in train[:20000] if r["family"] == "recall"]
for name, t, g in [("shipped (digits 1)", AutoTokenizer.from_pretrained("matvlm/assets/teacher"), 1),
                   ("v2 (groups of 3)", AutoTokenizer.from_pretrained("runs/v4_teacher"), 3), ("dg2 + all groups", new, 2)]:
    v = t.get_vocab()
    irregular = sum(1 for n in nums if [x.lstrip("Ġ") for x in t.tokenize(n)] != [n[i:i + g] for i in range(0, len(n), g)])
    per_word = sum(len(t.tokenize(" " + w)) for w in words) / len(words)
    rlen = sum(len(t(" ".join(c["value"] for c in r["conversations"]))["input_ids"]) for r in recall) / len(recall)
    print(f"{name}: digit tokens {sum(1 for k in v if re.fullmatch(r'Ġ?[0-9]+', k))}, OCR numbers split irregularly {irregular}/{len(nums)}, "
          f"tokens per OCR word {per_word:.2f}, recall record text tokens {rlen:.0f}")
