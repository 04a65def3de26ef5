# Usage: python benchmarks/probes/attribute_only_world.py attribute 3000 attr  (session 2; world of attribute questions only, patch 32)
import sys, json, torch
torch.set_num_threads(1)
from matvlm.data.synth import generate_world
from matvlm.teacher import TeacherConfig, train_teacher
fam = sys.argv[1].split(','); steps = int(sys.argv[2]); tag = sys.argv[3]
import pathlib
if not pathlib.Path(f'w_{tag}/train.json').exists():
    generate_world(f'w_{tag}', n_train=20000, n_test=300, seed=0, image_size=128, families=fam, workers=2)
cfg = TeacherConfig(data=f'w_{tag}', out=f'out_{tag}', template='phi_short', vocab_size=512, patch_size=32, vision_hidden=128,
    vision_layers=3, vision_heads=4, vision_feature_layer=-1, hidden=128, layers=4, heads=4, intermediate=512,
    batch_size=64, steps=steps, lr=2e-3, warmup=0.03, eval_every=250, eval_records=200, final_eval_records=200,
    save_every=1000, num_workers=0, preload=True)
train_teacher(cfg, progress=False)
