# Usage: python benchmarks/probes/text_binding_teacher_size.py N_OBJECTS LAYERS HIDDEN LR STEPS  (session 2: 2 4 192 1e-3 6000)
# text-only binding probe: how many steps until a Phi LM (teacher size) binds colour to shape?
import torch, random, sys, time
from transformers import PhiConfig, PhiForCausalLM
torch.manual_seed(0); random.seed(0); torch.set_num_threads(1)
cols = 'red green blue yellow purple cyan orange brown'.split(); shapes = 'square circle triangle star'.split()
words = ['<pad>', 'there', 'is', 'a', 'and', '.', 'what', 'color', 'the', '?', 'answer'] + cols + shapes
ix = {w: i for i, w in enumerate(words)}
nobj = int(sys.argv[1]); layers = int(sys.argv[2]); hidden = int(sys.argv[3]); lr = float(sys.argv[4]); steps = int(sys.argv[5])
def sample():
    sh = random.sample(shapes, nobj); co = random.sample(cols, nobj)
    toks = ['there', 'is']
    for j, (s, c) in enumerate(zip(sh, co)):
        toks += (['and'] if j else []) + ['a', c, s]
    k = random.randrange(nobj)
    toks += ['.', 'what', 'color', 'is', 'the', sh[k], '?', 'answer']
    return [ix[t] for t in toks], ix[co[k]]
cfg = PhiConfig(vocab_size=len(words), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 32,
                intermediate_size=4 * hidden, partial_rotary_factor=0.5, max_position_embeddings=64, resid_pdrop=0, embd_pdrop=0, attention_dropout=0)
m = PhiForCausalLM(cfg); opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
t0 = time.time()
for step in range(1, steps + 1):
    batch = [sample() for _ in range(64)]
    x = torch.tensor([b[0] for b in batch]); y = torch.tensor([b[1] for b in batch])
    logits = m(input_ids=x).logits[:, -1]
    loss = torch.nn.functional.cross_entropy(logits, y); loss.backward(); opt.step(); opt.zero_grad()
    if step % 250 == 0:
        acc = (logits.argmax(-1) == y).float().mean().item()
        print(step, round(loss.item(), 3), 'acc', acc, f'{time.time()-t0:.0f}s', flush=True)
