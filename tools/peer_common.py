"""What the PyTorch peers (`peer_llm_step.py`, `peer_train_step.py`) share: the training text
(the first client role of tiny Shakespeare, as fedlora's benches use it) and the step timing, by
the same phases as fedlora's benches (forward with the loss, backward, optimizer), medians in ms."""

import resource
import statistics
import time


def time_steps(loss_fn, opt, warmup, reps):
    """Runs `warmup + reps` steps of `loss_fn()`, backward and `opt.step()`; returns the medians
    over the last `reps` of each phase and of the whole step."""
    f, b, o, t = [], [], [], []
    for i in range(warmup + reps):
        s0 = time.perf_counter()
        loss = loss_fn()
        s1 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        s2 = time.perf_counter()
        opt.step()
        s3 = time.perf_counter()
        if i >= warmup:
            f.append((s1 - s0) * 1e3)
            b.append((s2 - s1) * 1e3)
            o.append((s3 - s2) * 1e3)
            t.append((s3 - s0) * 1e3)
    med = statistics.median
    return {"forward_ms": med(f), "backward_ms": med(b), "optimizer_ms": med(o), "total_ms": med(t)}


def peak_rss_mib():
    """This process's peak RSS (loading included); Linux reports ru_maxrss in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gloucester():
    """The lines of GLOUCESTER, the first client role of `data/tiny_shakespeare.txt`."""
    text = open("data/tiny_shakespeare.txt", encoding="utf-8").read()
    out = []
    for block in text.split("\n\n"):
        lines = block.split("\n")
        if lines and lines[0] == "GLOUCESTER:":
            out.extend(l + "\n" for l in lines[1:])
    return "".join(out)
