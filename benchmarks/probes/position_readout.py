# Usage: python benchmarks/probes/position_readout.py steps=N [patch_lr=1] [pos_lr=1] [pos_std=0] [grounded=0] [lr=2e-3]
#                                                    [objects=1] [attr_steps=0] [first=0] [listing=0] [real=0]
# Probe (session 7): can the teacher's architecture (patch 32: one grid cell per image token; ViT 3 x 128, Phi LM
# 4 x 128) read WHERE an object is? One object: "Where is the shape?" -> "row R, column C" (`grounded=1`: "a red
# circle in row R, column C"). `objects=N`: N objects of distinct colours and shapes, "Where is the red circle?";
# `attr_steps=K` first trains K batches of "What color is the circle?" (finding an object by content); `first=K` then
# K batches of the one-object "where" (which escapes its plateau on its own: session 8's sweep); `listing=P`: a share P
# of the "where" batches asks for every object and its cell in reading order (dense position labels); `real=1` takes
# the teacher's own records instead (matvlm/data/where.py: backgrounds vary, 2-6 objects). Prints, every
# 100 steps, the accuracy of the row/column digits (of the answer in the attribute phase) on the training batch and
# the norms of the patch projection's output and of the position table. On the CPU every one-object setup tried
# stayed at chance (0.25) for 150-600 steps, while the patch output grew from 12 to ~460 (benchmarks/teacher_runs.md).
import os, sys, random, time, pathlib, torch
from matvlm.data.scene import render, place, Obj, COLORS, SHAPES, SIZES, GRID
from matvlm.teacher import TeacherConfig, build_teacher, conversation_texts, teacher_param_groups
from matvlm.data.tokenizer import train_tokenizer
from matvlm.data.llava import SupervisedDataset, build_image_processor, collate
from matvlm.data.preload import PreloadedDataset
from matvlm.data.where import where_records

arg = {"steps": 1000, "patch_lr": 1.0, "pos_lr": 1.0, "pos_std": 0.0, "grounded": 0, "lr": 2e-3, "objects": 1, "attr_steps": 0, "first": 0, "listing": 0.0, "real": 0}
arg.update({k: float(v) for k, v in (a.split("=") for a in sys.argv[1:])})
steps, lr, grounded = int(arg["steps"]), arg["lr"], bool(arg["grounded"])
torch.set_num_threads(int(os.environ.get("THREADS", 2)))
torch.manual_seed(0); random.seed(0)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
n_obj, attr_steps, first, listing = int(arg["objects"]), int(arg["attr_steps"]), int(arg["first"]), arg["listing"]


def world(n: int) -> tuple[pathlib.Path, list[dict], list[dict], list[dict]]:
    """3,000 images of n objects of distinct shapes and colours in distinct cells: "where", "what colour" and listing
    records (every object and its cell, in reading order)."""
    d = pathlib.Path(os.environ.get("PROBE_DIR", "runs/probe_where") + f"_{n}"); d.mkdir(parents=True, exist_ok=True)
    rng, recs, attr_recs, list_recs = random.Random(0), [], [], []
    for i in range(3000):
        shapes, colors = rng.sample(SHAPES, n), rng.sample(list(COLORS), n)
        objs = place(rng, [Obj(sh, co, rng.choice(SIZES)) for sh, co in zip(shapes, colors)],
                     rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n), 128)
        if not (d / f"{i}.png").exists():
            render({"image_size": 128, "background": "white", "objects": objs}).save(d / f"{i}.png")
        o = rng.choice(objs)
        answer = (f"a {o['color']} {o['shape']} in " if grounded else "") + f"row {o['row'] + 1}, column {o['col'] + 1}"
        question = "Where is the shape?" if n == 1 else f"Where is the {o['color']} {o['shape']}?"
        recs.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]})
        attr_recs.append({"id": f"{i}-attr", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nWhat color is the {o['shape']}?"}, {"from": "gpt", "value": o["color"]}]})
        listed = ", ".join(f"a {p['color']} {p['shape']} in row {p['row'] + 1}, column {p['col'] + 1}"
                           for p in sorted(objs, key=lambda p: (p["row"], p["col"])))
        list_recs.append({"id": f"{i}-list", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nList the objects and where they are."}, {"from": "gpt", "value": listed}]})
    return d, recs, attr_recs, list_recs


d, recs, attr_recs, list_recs = world(n_obj)
list_recs = list_recs if listing else []
d1, recs1, _, _ = world(1) if first else (d, [], [], [])
if arg["real"]:  # the teacher's where_records: where1 (first phase), where, where_list
    d = d1 = pathlib.Path(os.environ.get("PROBE_DIR", "runs/probe_where") + "_real")
    made = where_records(d, 3000, seed=0, world_json="runs/world/world.json")
    recs1, recs, list_recs = ([r for r in made if r["family"] == f] for f in ("where1", "where", "where_list"))
    recs1, list_recs, attr_recs = recs1 if first else [], list_recs if listing else [], []  # no colour phase here
tok = train_tokenizer(conversation_texts(recs + attr_recs + recs1 + list_recs), vocab_size=300, template="phi_short")
cfg = TeacherConfig(data="", out="", template="phi_short", vocab_size=300, patch_size=32, vision_hidden=128, vision_layers=3,
                    vision_heads=4, vision_feature_layer=-1, hidden=128, layers=4, heads=4, intermediate=512,
                    patch_lr_scale=arg["patch_lr"], position_lr_scale=arg["pos_lr"], position_init_std=arg["pos_std"])
model = build_teacher(cfg, tok).to(dev).train()
processor = build_image_processor(128)
ds, ds_attr, ds_one, ds_list = (PreloadedDataset(SupervisedDataset(r, [folder], tok, processor, "phi_short", num_image_tokens=16, max_length=256),
                                        workers=0, progress=False) if r else None for r, folder in ((recs, d), (attr_recs, d), (recs1, d1), (list_recs, d)))
groups = teacher_param_groups(model, cfg)
opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
for g in opt.param_groups:
    g["lr"] = lr * g["lr_scale"]
digits = torch.tensor([tok.convert_tokens_to_ids(c) for c in "1234"], device=dev)
emb, t0 = model.model.vision_tower.embeddings, time.time()
print("args", arg, flush=True)
phases = [(ds_attr, "attr")] * attr_steps + [(ds_one, "where1")] * first + [(ds, "where")] * steps
for s, (source, phase) in enumerate(phases):
    # attr: "What color is the <shape>?" (finding an object by content); where1: the one-object "where"; then "where"
    if phase == "where" and listing and (s + 1) % 100 and random.random() < listing:
        source = ds_list  # that share of the "where" batches list every object's cell instead (logged steps never)
    b = collate([source[i] for i in random.sample(range(len(source)), 64)], pad_token_id=tok.pad_token_id)
    b = {k: v.to(dev) for k, v in b.items() if torch.is_tensor(v)}
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], pixel_values=b["pixel_values"])
    out.loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()
    if (s + 1) % 100 == 0:
        pred, lab = out.logits[:, :-1].argmax(-1), b["labels"][:, 1:]
        dg = torch.isin(lab, digits) if phase != "attr" else lab != -100  # attribute phase: answer-token accuracy
        with torch.no_grad():
            pe = emb.patch_embedding(b["pixel_values"][:4].float()).flatten(2).norm(dim=1).mean().item()
        print(s + 1, phase, f"loss {out.loss.item():.3f} digit_acc {((pred == lab) & dg).sum().item() / dg.sum().item():.3f}",
              f"patch_norm {pe:.1f} position_norm {emb.position_embedding.weight.norm(dim=-1).mean().item():.2f} {time.time() - t0:.0f}s", flush=True)
