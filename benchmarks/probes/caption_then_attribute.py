# Usage: python benchmarks/probes/caption_then_attribute.py CAPTION_STEPS ATTRIBUTE_STEPS  (session 2: 1000 2000; needs the attribute world of attribute_only_world.py under /tmp/attr)
# Curriculum probe: caption-only steps first (teaches per-token colour+shape features), then attribute.
import sys, json, random, torch, pathlib, itertools
torch.set_num_threads(1); torch.manual_seed(0); random.seed(0)
from matvlm.data.synth import generate_world
from matvlm.teacher import TeacherConfig, build_teacher, conversation_texts
from matvlm.data.tokenizer import train_tokenizer
from matvlm.data.llava import SupervisedDataset, build_image_processor, collate, load_records
from matvlm.data.preload import PreloadedDataset
from matvlm.eval.runner import evaluate
cap_steps = int(sys.argv[1]); attr_steps = int(sys.argv[2])
if not pathlib.Path('w_cap/train.json').exists():
    generate_world('w_cap', n_train=8000, n_test=0, seed=0, image_size=128, families=['caption'], workers=1)
attr = load_records('/tmp/attr/w_attr/train.json'); attr_test = load_records('/tmp/attr/w_attr/test.json')[:200]
cap = load_records('w_cap/train.json')
tok = train_tokenizer(conversation_texts(attr + cap), vocab_size=512, template='phi_short')
cfg = TeacherConfig(data='', out='', template='phi_short', vocab_size=512, patch_size=32, vision_hidden=128, vision_layers=3,
    vision_heads=4, vision_feature_layer=-1, hidden=128, layers=4, heads=4, intermediate=512)
model = build_teacher(cfg, tok).train()
ip = build_image_processor(128)
mk = lambda recs, d: PreloadedDataset(SupervisedDataset(recs, [d], tok, ip, 'phi_short', num_image_tokens=16, max_length=1024), workers=0, progress=False)
ds_cap = mk(cap, 'w_cap/images'); ds_attr = mk(attr, '/tmp/attr/w_attr/images')
opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
def run(ds, steps, tag, start):
    for s in range(steps):
        b = collate([ds[i] for i in random.sample(range(len(ds)), 64)], pad_token_id=tok.pad_token_id)
        n = int((b['labels'][:, 1:] != -100).sum())
        loss = model(input_ids=b['input_ids'], attention_mask=b['attention_mask'], labels=b['labels'], pixel_values=b['pixel_values'], num_items_in_batch=n).loss
        loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()
        step = start + s + 1
        if step % 250 == 0:
            res = evaluate(model, tok, ip, attr_test, ['/tmp/attr/w_attr/images'], 'phi_short', batch_size=100, progress=False)
            model.train()
            print(tag, step, round(loss.item(), 3), 'attribute', round(res['average'], 3), flush=True)
run(ds_cap, cap_steps, 'caption', 0)
run(ds_attr, attr_steps, 'attribute', cap_steps)
