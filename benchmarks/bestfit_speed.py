import time, numpy as np, importlib.util, sys
from tokenfeed.producer.bestfit import BestFitPacker as New
spec = importlib.util.spec_from_file_location("old_bestfit", "/tmp/old_bestfit.py")
old = importlib.util.module_from_spec(spec); sys.modules["old_bestfit"] = old; spec.loader.exec_module(old)
Old = old.BestFitPacker
rng = np.random.default_rng(0)
B,T=32,2048
us=[]
for u in range(40):
    lens = np.maximum(1, rng.lognormal(np.log(600), 1.0, 1024).astype(np.int64))
    toks = rng.integers(0, 50000, lens.sum(), dtype=np.int64).astype(np.uint32)
    us.append((u, toks, np.cumsum(lens) - lens))
def run(cls):
    p = cls(B, T)
    out = np.empty(B*(T+1), dtype=np.uint32)
    tr=tf=0; n=0
    for u,toks,starts in us:
        p.push(u,toks,starts)
        while True:
            t0=time.perf_counter(); r=p.ready(); t1=time.perf_counter(); tr+=t1-t0
            if not r: break
            p.fill(out); tf+=time.perf_counter()-t1; n+=1
    return tr/n*1e3, tf/n*1e3, n
res={"old":[], "new":[]}
for i in range(6):
    for name, cls in ((("old", Old), ("new", New)) if i % 2 else (("new", New), ("old", Old))):
        res[name].append(run(cls))
for name, r in res.items():
    pack=min(x[0] for x in r); fill=min(x[1] for x in r); tot=min(x[0]+x[1] for x in r)
    print(f"{name}: pack {pack:.3f} ms, fill {fill:.3f} ms, total {tot:.3f} ms per window ({r[0][2]} windows; best of 5)")
