"""Probe: does the teacher architecture learn to bind a colour to a named shape (two objects)?

    python benchmarks/probes/colour_shape_binding.py OBJECT_PX N_OBJECTS STEPS PATCH [N_IMAGES]

Draws its own images under ./bind/images, trains a small SigLIP + Phi Llava, prints held-out accuracy.
"""
import torch, random, sys, os
from PIL import Image, ImageDraw
from matvlm.teacher import TeacherConfig, build_teacher
from matvlm.data.tokenizer import train_tokenizer
from matvlm.data.llava import SupervisedDataset, build_image_processor, collate
torch.manual_seed(0); random.seed(0); torch.set_num_threads(2)
size = int(sys.argv[1]); nobj = int(sys.argv[2]); steps = int(sys.argv[3])
cols = {'red':(220,30,30),'green':(30,200,30),'blue':(30,30,220),'yellow':(230,230,30),'purple':(150,30,200),'cyan':(30,220,220),'orange':(250,140,20),'brown':(120,70,20)}
shapes = ['square', 'circle', 'triangle'][:nobj]
os.makedirs('bind/images', exist_ok=True)
recs = []
N = int(sys.argv[5]) if len(sys.argv) > 5 else 1500
for i in range(N):
    im = Image.new('RGB', (128,128), (230,230,230)); d = ImageDraw.Draw(im)
    cells = random.sample([(x, y) for x in range(4) for y in range(4)], nobj)
    colors = random.sample(list(cols), nobj)
    for sh, c, (cx, cy) in zip(shapes, colors, cells):
        x0, y0 = cx*32 + (32-size)//2, cy*32 + (32-size)//2
        box = (x0, y0, x0+size, y0+size)
        if sh == 'square': d.rectangle(box, fill=cols[c])
        elif sh == 'circle': d.ellipse(box, fill=cols[c])
        else: d.polygon([(x0, y0+size), (x0+size, y0+size), (x0+size//2, y0)], fill=cols[c])
    im.save(f'bind/images/{i}.png')
    k = random.randrange(nobj)
    recs.append({'id': str(i), 'image': f'{i}.png', 'conversations': [{'from':'human','value':f'<image>\nWhat color is the {shapes[k]}?'},{'from':'gpt','value':colors[k]}]})
tok = train_tokenizer([c for c in cols] + [f'What color is the {s}?' for s in shapes]*5, vocab_size=300)
cfg = TeacherConfig(data='', out='', patch_size=int(sys.argv[4]), vision_layers=4, vision_feature_layer=-1, hidden=96, layers=2, heads=4, intermediate=192, vision_hidden=96, vision_heads=4)
m = build_teacher(cfg, tok).train()
ds = SupervisedDataset(recs, ['bind/images'], tok, build_image_processor(128), 'phi', num_image_tokens=(128//int(sys.argv[4]))**2, max_length=512)
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
def heldout():
    m.eval(); correct = 0
    for i in range(N - 200, N):
        it = ds[i]
        with torch.no_grad(): lg = m(input_ids=it['input_ids'][None], pixel_values=it['pixel_values'][None]).logits[0]
        lab = it['labels']; pos = (lab[1:] != -100).nonzero()[:,0]
        correct += int((lg[pos].argmax(-1) == lab[1:][pos]).all())
    m.train(); return correct / 200
for step in range(steps):
    b = collate([ds[i] for i in random.sample(range(N - 200), 32)], pad_token_id=tok.pad_token_id)
    loss = m(input_ids=b['input_ids'], attention_mask=b['attention_mask'], labels=b['labels'], pixel_values=b['pixel_values']).loss
    loss.backward(); opt.step(); opt.zero_grad()
    if (step + 1) % 100 == 0: print(step + 1, round(loss.item(), 3), 'heldout', heldout(), flush=True)
