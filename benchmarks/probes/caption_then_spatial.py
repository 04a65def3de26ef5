# Usage: python benchmarks/probes/caption_then_spatial.py FIRST_STEPS SPATIAL_STEPS [WORKDIR] [caption|where]
# (session 6: 0 2500, 1000 2500 caption, 1000 2500 where; POS=sincos 0 2000)
# Probe: can the teacher's architecture (patch 32: one grid cell per image token) learn the spatial family's
# relations between two named objects, from scratch or after caption-only steps (which made colour-shape
# binding learnable in session 2), or after "where" steps (questions on the spatial training images whose
# answer is an object's grid cell: "Where is the red circle?" -> "row 3, column 1", made here from the scenes)?
# Held-out accuracy on 300 spatial test records every 250 steps.
import os, sys, random, torch, pathlib
torch.set_num_threads(1); torch.manual_seed(0); random.seed(0)
from matvlm.data.synth import generate_world
from matvlm.teacher import TeacherConfig, build_teacher, conversation_texts, teacher_param_groups
from matvlm.data.tokenizer import train_tokenizer
from matvlm.data.llava import SupervisedDataset, build_image_processor, collate, load_records
from matvlm.data.preload import PreloadedDataset
from matvlm.eval.runner import evaluate
cap_steps, sp_steps = int(sys.argv[1]), int(sys.argv[2])
work = pathlib.Path(sys.argv[3] if len(sys.argv) > 3 else 'probe_spatial')
for fam, n_test in (('caption', 0), ('spatial', 300)):
    if not (work / fam / 'train.json').exists():
        generate_world(work / fam, n_train=8000, n_test=n_test, seed=0, image_size=128, families=[fam], workers=1)
first = sys.argv[4] if len(sys.argv) > 4 else 'caption'
cap, sp = load_records(work / 'caption/train.json'), load_records(work / 'spatial/train.json')
if first == 'where':  # one question per image about an object that its colour and shape name uniquely
    where = []
    for r in sp:
        objs = r['scene']['objects']
        unique = [o for o in objs if sum(p['color'] == o['color'] and p['shape'] == o['shape'] for p in objs) == 1]
        if not unique:
            continue
        o = random.choice(unique)
        where.append({'id': r['id'] + '-where', 'image': r['image'], 'conversations': [
            {'from': 'human', 'value': f"<image>\nWhere is the {o['color']} {o['shape']}?"},
            {'from': 'gpt', 'value': f"row {o['row'] + 1}, column {o['col'] + 1}"}]})
    cap = where
sp_test = load_records(work / 'spatial/test.json')
tok = train_tokenizer(conversation_texts(sp + cap), vocab_size=512, template='phi_short')
cfg = TeacherConfig(data='', out='', template='phi_short', vocab_size=512, patch_size=32, vision_hidden=128, vision_layers=3,
                    vision_heads=4, vision_feature_layer=-1, hidden=128, layers=4, heads=4, intermediate=512,
                    patch_lr_scale=float(os.environ.get('PATCH_LR', 1.0)), position_init_std=float(os.environ.get('POS_STD', 0.0)))
model = build_teacher(cfg, tok).train()
if os.environ.get('POS') == 'sincos':  # SigLIP's learned position embeddings start as a 2-D sin-cos code
    table = model.model.vision_tower.embeddings.position_embedding.weight
    side, dim = int(table.shape[0] ** 0.5), table.shape[1]
    freq = 1.0 / (100 ** (torch.arange(dim // 4) / (dim // 4)))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing='ij')
    code = [f(t.flatten()[:, None].float() * freq) for t in (rows, cols) for f in (torch.sin, torch.cos)]
    with torch.no_grad():
        table.copy_(torch.cat(code, dim=1))
ip = build_image_processor(128)
mk = lambda recs, d: PreloadedDataset(SupervisedDataset(recs, [d], tok, ip, 'phi_short', num_image_tokens=16, max_length=1024), workers=0, progress=False)
ds_cap, ds_sp = mk(cap, work / (first if first == 'caption' else 'spatial') / 'images'), mk(sp, work / 'spatial/images')
# PATCH_LR / POS_STD (session 7): the teacher's patch_lr_scale / position_init_std options
opt = torch.optim.AdamW(teacher_param_groups(model, cfg), lr=2e-3, betas=(0.9, 0.95))
for group in opt.param_groups:
    group['lr'] = 2e-3 * group['lr_scale']


EVERY = int(os.environ.get('EVERY', 250))


def run(ds, steps, tag, start):
    for s in range(steps):
        b = collate([ds[i] for i in random.sample(range(len(ds)), 64)], pad_token_id=tok.pad_token_id)
        n = int((b['labels'][:, 1:] != -100).sum())
        loss = model(input_ids=b['input_ids'], attention_mask=b['attention_mask'], labels=b['labels'],
                     pixel_values=b['pixel_values'], num_items_in_batch=n).loss
        loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()
        step = start + s + 1
        if step % EVERY == 0:
            if tag != 'spatial':
                print(tag, step, round(loss.item(), 3), flush=True); continue
            res = evaluate(model, tok, ip, sp_test, [work / 'spatial/images'], 'phi_short', batch_size=100, progress=False)
            model.train()
            print(tag, step, round(loss.item(), 3), 'spatial', round(res['average'], 3), flush=True)


run(ds_cap, cap_steps, first, 0)
run(ds_sp, sp_steps, 'spatial', cap_steps)
