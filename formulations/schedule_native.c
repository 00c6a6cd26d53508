/* The layered down-set search of formulations/schedule_vec.py, one state at a time in C.
 *
 * Same model, rules and answers as schedule_vec.search (forward) and schedule_guide.coreachable
 * (backward, with the small buffers certainly resident at tight steps when the tables have them);
 * formulations/schedule_native.py builds the tables, compiles this file and calls it.
 * A state: a set of units (W 64-bit words), its Zobrist key, the key of its relaxed projection
 * (the guide), the lowest peak reaching it, the bytes resident after it (a function of the set),
 * the forced units of a committed sequence (q0, q1) and the defer constraint (after).
 * Children of a layer are merged in an open-addressing table on the key; equal keys are compared
 * word by word, so a key collision costs a probe, never a wrong merge.
 * Unit steps come from per-unit tables indexed by predicate codes; an entry not yet seen is
 * filled by a call back into Python (Problem.step on that state), once per table.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <pthread.h>

#define NONE (-1)
#define UNSET INT64_MIN

typedef int (*fill_fn)(int32_t unit, const uint64_t *set, int64_t *out);

typedef struct {
    int32_t m, W;
    const uint64_t *pred, *succ;       /* m x W: predecessor / successor unit sets */
    const uint64_t *zob;               /* m: Zobrist keys */
    const int32_t *succ_start;         /* m + 1: range of each unit's successors in succ_list */
    const int16_t *succ_list;
    const int32_t *pred_start;         /* m + 1: range of each unit's predecessors in pred_list */
    const int16_t *pred_list;
    const uint8_t *commit, *deferrable;
    const uint8_t *near;               /* (m + 1) x m: row m allows every unit */
    const int32_t *test_start;         /* m + 1: predicate range of each unit */
    const uint64_t *test_and;          /* per predicate, W words that must all be in the set */
    const int32_t *term_start;         /* per predicate + 1: range of its OR terms */
    const uint64_t *term_or;           /* per term, W words of which one must be in the set */
    const int64_t *dense_off;          /* m: offset of the unit's (dpeak, dmem) table by code */
    int64_t *dense;
    const int32_t *sc_start;           /* m + 1: set commits whose first unit is u */
    const int16_t *sc_seq;             /* per set commit: 3 units (-1 padded) */
    const uint64_t *sc_need, *sc_absent; /* per set commit, W words each */
    const int64_t *sm_size;            /* per small buffer (schedule_guide.SmallBuffers): real bytes */
    const uint8_t *sm_always;          /* 1: a reader has run in every state */
    const uint8_t *sm_single;          /* m: the unit has one op */
    const uint64_t *sm_done;           /* W words: a unit of it in the set: a reader has run or runs */
    const int32_t *sm_wit;             /* n + 1: range of each buffer's witnesses */
    const uint64_t *wit_a;             /* per witness, W words: none may be in the set */
    const int32_t *wit_b;              /* per witness + 1: range of its masks of which one must miss the set
                                          (an empty range: none needed) */
    const uint64_t *wit_bmask;
    const uint64_t *ukey;              /* m: relaxed unit keys of the guide (NULL: no guide) */
    const uint64_t *gtable;            /* the guide's Bloom table */
    uint64_t gshift;
    fill_fn fill;
    int32_t set_commit, defer, commit_rule;
    int32_t sm_n;                      /* small buffers (0: none) */
    int64_t sm_large;                  /* a step within this of the limit is tight */
} Tables;

typedef struct { uint64_t key; int64_t idx; } Slot;

/* What a merge reads and writes of an entry, in one place (one cache line). */
typedef struct { int64_t peak; int32_t parent; int16_t unit, q0, q1, after; } Meta;

typedef struct {
    int64_t n, cap;
    uint64_t *set, *ready, *key, *rkey;  /* ready: units not in the set whose predecessors are */
    int64_t *mem;
    Meta *meta;
    Slot *slot;      /* hash table (idx -1: empty) */
    int64_t slots;
} Layer;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int subset(const uint64_t *a, const uint64_t *s, int W) {
    for (int w = 0; w < W; w++)
        if (a[w] & ~s[w]) return 0;
    return 1;
}

static int meets(const uint64_t *a, const uint64_t *s, int W) {
    for (int w = 0; w < W; w++)
        if (a[w] & s[w]) return 1;
    return 0;
}

/* (dpeak, dmem) of running unit u from the set s (u's own bit is never tested). 0: ok, -1: fill failed. */
static int delta(const Tables *t, int u, const uint64_t *s, int64_t *dp, int64_t *dm) {
    int W = t->W;
    int64_t code = 0;
    for (int j = t->test_start[u], b = 0; j < t->test_start[u + 1]; j++, b++) {
        int bit = subset(t->test_and + (int64_t)j * W, s, W);
        for (int k = t->term_start[j]; bit && k < t->term_start[j + 1]; k++)
            bit = meets(t->term_or + (int64_t)k * W, s, W);
        code |= (int64_t)bit << b;
    }
    int64_t *e = t->dense + t->dense_off[u] + 2 * code;
    int64_t p = __atomic_load_n(&e[0], __ATOMIC_ACQUIRE);  /* e[0] is written last: e[1] is set when it is */
    if (p == UNSET) {
        int64_t out[2];
        if (!t->fill(u, s, out)) return -1;
        e[1] = out[1];
        __atomic_store_n(&e[0], out[0], __ATOMIC_RELEASE);
        p = out[0];
    }
    *dp = p;
    *dm = e[1];
    return 0;
}

static int admits(const Tables *t, uint64_t rkey) {
    uint64_t at = rkey >> t->gshift;
    return (t->gtable[at >> 6] >> (at & 63)) & 1;
}

static void layer_free(Layer *L) {
    free(L->set); free(L->ready); free(L->key); free(L->rkey); free(L->mem); free(L->meta); free(L->slot);
    memset(L, 0, sizeof *L);
}

static int layer_reserve(Layer *L, int64_t cap, int W) {
    if (cap <= L->cap) return 0;
    int64_t c = L->cap ? L->cap : 1024;
    while (c < cap) c *= 2;
#define GROW(f, T, k) do { void *p = realloc(L->f, (size_t)c * (k) * sizeof(T)); if (!p) return -1; L->f = p; } while (0)
    GROW(set, uint64_t, W); GROW(ready, uint64_t, W); GROW(key, uint64_t, 1); GROW(rkey, uint64_t, 1);
    GROW(mem, int64_t, 1); GROW(meta, Meta, 1);
#undef GROW
    L->cap = c;
    return 0;
}

static uint64_t home(uint64_t key, int64_t slots) { return (key * 0x9E3779B97F4A7C15ULL) >> 20 & (slots - 1); }

static void rehash(Layer *L, int64_t slots);

/* Empty L, its table sized for `expect` entries (the next layer is rarely twice the last). */
static void clear(Layer *L, int64_t expect) {
    L->n = 0;
    int64_t want = 4096;
    while (want < 4 * expect) want *= 2;
    if (L->slots < want) rehash(L, want);
    else memset(L->slot, 0xff, (size_t)L->slots * sizeof(Slot));
}

static void rehash(Layer *L, int64_t slots) {
    free(L->slot);
    L->slot = malloc((size_t)slots * sizeof(Slot));
    L->slots = slots;
    if (!L->slot) return;
    memset(L->slot, 0xff, (size_t)slots * sizeof(Slot));
    for (int64_t i = 0; i < L->n; i++) {
        uint64_t h = home(L->key[i], slots);
        while (L->slot[h].idx >= 0) h = (h + 1) & (slots - 1);
        L->slot[h] = (Slot){L->key[i], i};
    }
}

/* Add the child (set, key, ...) to L, merged with an equal set: the lowest peak keeps its parent;
 * different forced queues or defer constraints among equal sets leave none. -1: out of memory. */
static int add(Layer *L, int W, const uint64_t *set, const uint64_t *ready, uint64_t key, uint64_t rkey, int64_t peak, int64_t mem,
               int16_t q0, int16_t q1, int16_t after, int32_t parent, int16_t unit) {
    if (!L->slot || 2 * (L->n + 1) > L->slots) {
        rehash(L, L->slots ? 2 * L->slots : 4096);
        if (!L->slot) return -1;
    }
    uint64_t h = home(key, L->slots);
    for (; L->slot[h].idx >= 0; h = (h + 1) & (L->slots - 1)) {
        int64_t j = L->slot[h].idx;
        if (L->slot[h].key != key || memcmp(L->set + j * W, set, (size_t)W * 8)) continue;
        Meta *e = &L->meta[j];
        if (e->q0 != q0 || e->q1 != q1 || e->after != after) e->q0 = e->q1 = e->after = NONE;
        if (peak < e->peak) {
            e->peak = peak;
            e->parent = parent;
            e->unit = unit;
        }
        return 0;
    }
    if (layer_reserve(L, L->n + 1, W)) return -1;
    int64_t i = L->n++;
    memcpy(L->set + i * W, set, (size_t)W * 8);
    if (ready) memcpy(L->ready + i * W, ready, (size_t)W * 8);
    L->key[i] = key; L->rkey[i] = rkey; L->mem[i] = mem;
    L->meta[i] = (Meta){peak, parent, unit, q0, q1, after};
    L->slot[h] = (Slot){key, i};
    return 0;
}

/* The ready units of set + u (`child`), from those of the set. */
static void ready_after(const Tables *t, const uint64_t *ready, const uint64_t *child, int u, uint64_t *out) {
    int W = t->W;
    memcpy(out, ready, (size_t)W * 8);
    out[u >> 6] &= ~(1ULL << (u & 63));
    for (int k = t->succ_start[u]; k < t->succ_start[u + 1]; k++) {
        int v = t->succ_list[k];
        if (subset(t->pred + (int64_t)v * W, child, W)) out[v >> 6] |= 1ULL << (v & 63);
    }
}

/* The units of set - u (`child`) that have no successor in it (may run last), from those of the set. */
static void last_after(const Tables *t, const uint64_t *last, const uint64_t *child, int u, uint64_t *out) {
    int W = t->W;
    memcpy(out, last, (size_t)W * 8);
    out[u >> 6] &= ~(1ULL << (u & 63));
    for (int k = t->pred_start[u]; k < t->pred_start[u + 1]; k++) {
        int v = t->pred_list[k];
        if (!meets(t->succ + (int64_t)v * W, child, W)) out[v >> 6] |= 1ULL << (v & 63);
    }
}

typedef struct { int16_t u, then; int64_t peak, mem; uint64_t key, rkey; } Cand;

enum { OPTIMAL = 0, NO_BETTER = 1, GAVE_UP = 2, FAILED = 3 };

#define THREADS 2          /* the machines here have two cores */
int64_t split_from = 20000;  /* a layer of fewer states is expanded by one thread (tests lower it) */

/* One thread's share of a layer: states [lo, hi) of `cur` expanded into `out`. */
typedef struct {
    const Tables *t;
    const Layer *cur;
    Layer out;
    int64_t lo, hi, limit;
    double end;
    int status;
    Cand *cand;
    uint64_t *child, *rows, *ready;
    int64_t *udp, *udm, *seen, gen;  /* the state's deltas of its ready units (seen[u] == gen: set) */
    int64_t *minus;                  /* backward: per unit, forced()'s minus (0 between states) */
    int32_t *touched;                /* the units whose minus is set */
} Work;

static int work_init(Work *w, const Tables *t) {
    memset(w, 0, sizeof *w);
    w->t = t;
    w->cand = malloc((size_t)(t->m + 1) * sizeof *w->cand);
    w->child = calloc(t->W, 8); w->rows = calloc(t->W, 8); w->ready = calloc(t->W, 8);
    w->udp = calloc(t->m + 1, 8); w->udm = calloc(t->m + 1, 8); w->seen = calloc(t->m + 1, 8);
    w->minus = calloc(t->m + 1, 8); w->touched = calloc(t->m + 1, 4);
    return w->cand && w->child && w->rows && w->ready && w->udp && w->udm && w->seen && w->minus && w->touched
        ? 0 : -1;
}

static void work_free(Work *w) {
    free(w->cand); free(w->child); free(w->rows); free(w->ready); free(w->udp); free(w->udm); free(w->seen);
    free(w->minus); free(w->touched);
    layer_free(&w->out);
}

/* Children of one forward state i (schedule_vec._expand's rules) added to w->out. */
static int expand_one(Work *w, int64_t i) {
    const Tables *t = w->t;
    const Layer *cur = w->cur;
    Layer *next = &w->out;
    int m = t->m, W = t->W;
    Cand *cand = w->cand;
    uint64_t *child = w->child, *rows = w->rows, *ready = w->ready;
    const uint64_t *s = cur->set + i * W, *rd = cur->ready + i * W;
    const Meta *me = &cur->meta[i];
    int64_t pk = me->peak, mm = cur->mem[i], dp, dm;
    if (me->q0 >= 0) {  /* inside a committed sequence: its next unit */
        int u = me->q0;
        if (delta(t, u, s, &dp, &dm)) return FAILED;
        uint64_t rk = t->ukey ? cur->rkey[i] ^ t->ukey[u] : 0;
        if (t->ukey && !admits(t, rk)) return 0;
        memcpy(child, s, (size_t)W * 8);
        child[u >> 6] ^= 1ULL << (u & 63);
        ready_after(t, rd, child, u, ready);
        int64_t p2 = mm + dp > pk ? mm + dp : pk;
        return add(next, W, child, ready, cur->key[i] ^ t->zob[u], rk, p2, mm + dm, me->q1, NONE, NONE,
                   (int32_t)i, (int16_t)u) ? FAILED : 0;
    }
    int nc = 0, chosen = -1;
    w->gen++;
    for (int x = 0; x < W; x++) for (uint64_t b = rd[x]; b; b &= b - 1) {
        int u = 64 * x + __builtin_ctzll(b);
        if (delta(t, u, s, &dp, &dm)) return FAILED;
        w->udp[u] = dp; w->udm[u] = dm; w->seen[u] = w->gen;
        int64_t step = mm + dp, p2 = step > pk ? step : pk;
        if (p2 >= w->limit) continue;
        cand[nc] = (Cand){(int16_t)u, (int16_t)(t->defer && t->deferrable[u] && dp == dm && dm >= 0 ? u : NONE),
                          p2, mm + dm, 0, 0};
        if (t->commit_rule && t->commit[u] && step <= pk && dm <= 0) {  /* its only child: stop looking */
            chosen = nc++;
            goto scanned;
        }
        nc++;
    }
scanned:;
    int16_t q0 = NONE, q1 = NONE;
    if (chosen < 0 && t->commit_rule && t->set_commit && nc) {  /* a committable sequence P + c */
        for (int x = 0; x < W && chosen < 0; x++) for (uint64_t b = rd[x]; b && chosen < 0; b &= b - 1) {
            int r = 64 * x + __builtin_ctzll(b);
            for (int c = t->sc_start[r]; c < t->sc_start[r + 1]; c++) {
                const int16_t *seq = t->sc_seq + 3 * c;
                if (!subset(t->sc_need + (int64_t)c * W, s, W) || meets(t->sc_absent + (int64_t)c * W, s, W))
                    continue;
                int len = seq[2] >= 0 ? 3 : 2, ok = 1;
                int64_t at = mm, lowest = mm, first = mm;
                memcpy(rows, s, (size_t)W * 8);
                for (int j = 0; j < len && ok; j++) {
                    if (j == 0) dp = w->udp[seq[0]], dm = w->udm[seq[0]];  /* r: ready, scanned above */
                    else if (delta(t, seq[j], rows, &dp, &dm)) return FAILED;
                    ok = at + dp <= pk;
                    at += dm;
                    if (j == 0) first = at;
                    if (j < len - 1) {
                        if (at < lowest) lowest = at;
                        rows[seq[j] >> 6] |= 1ULL << (seq[j] & 63);
                    }
                }
                if (ok && len == 3) {  /* the other order's first set: the second of P alone (ready too) */
                    if (w->seen[seq[1]] == w->gen) dm = w->udm[seq[1]];
                    else if (delta(t, seq[1], s, &dp, &dm)) return FAILED;
                    if (mm + dm < lowest) lowest = mm + dm;
                }
                if (ok && at <= lowest) {
                    cand[nc] = (Cand){seq[0], NONE, pk, first, 0, 0};
                    chosen = nc;
                    q0 = seq[1];
                    q1 = len == 3 ? seq[2] : NONE;
                    break;
                }
            }
        }
    }
    const uint8_t *near = t->near + (int64_t)(me->after < 0 ? m : me->after) * m;
    int lo = chosen < 0 ? 0 : chosen, hi = chosen < 0 ? nc : chosen + 1, kept = 0;
    for (int c = lo; c < hi; c++) {  /* keys first, their table entries fetched ahead */
        int u = cand[c].u;
        /* defer: near the anchor, or itself deferred with a higher index (schedule_vec's rule) */
        if (chosen < 0 && !near[u] && !(cand[c].then >= 0 && u > me->after)) continue;
        cand[kept] = cand[c];
        Cand *x = &cand[kept++];
        x->key = cur->key[i] ^ t->zob[u];
        x->rkey = t->ukey ? cur->rkey[i] ^ t->ukey[u] : 0;
        if (t->ukey) __builtin_prefetch(t->gtable + ((x->rkey >> t->gshift) >> 6));
        if (next->slots) __builtin_prefetch(next->slot + home(x->key, next->slots));
    }
    for (int c = 0; c < kept && next->slots; c++) {  /* an entry already there: its row and meta next */
        const Slot *sl = next->slot + home(cand[c].key, next->slots);
        if (sl->idx >= 0 && sl->key == cand[c].key) {
            __builtin_prefetch(next->set + sl->idx * W);
            __builtin_prefetch(next->meta + sl->idx);
        }
    }
    for (int c = 0; c < kept; c++) {
        int u = cand[c].u;
        if (t->ukey && !admits(t, cand[c].rkey)) continue;
        memcpy(child, s, (size_t)W * 8);
        child[u >> 6] ^= 1ULL << (u & 63);
        ready_after(t, rd, child, u, ready);
        if (add(next, W, child, ready, cand[c].key, cand[c].rkey, cand[c].peak, cand[c].mem,
                chosen < 0 ? NONE : q0, chosen < 0 ? NONE : q1, chosen < 0 ? cand[c].then : NONE,
                (int32_t)i, (int16_t)u))
            return FAILED;
    }
    return 0;
}

/* The small buffers certainly resident at a tight step into the set s (SmallBuffers.forced), for every
 * unit that may run last at once: their bytes (`base`, every reader in s counted as run), and per unit u
 * the bytes of those whose only reader in s is in u (`minus[u]`): for a unit of several ops such a
 * reader does not count as run (its highest step may come first), so it takes base - minus[u].
 * The units whose minus was set go to `touched` (*nt of them) for the caller to reset. */
static int64_t forced(const Tables *t, const uint64_t *s, int64_t *minus, int32_t *touched, int *nt) {
    int W = t->W;
    int64_t base = 0;
    for (int j = 0; j < t->sm_n; j++) {
        const uint64_t *d = t->sm_done + (int64_t)j * W;
        int only = -1;  /* the unit of the one reader in s, -2: several */
        if (!t->sm_always[j]) {
            for (int w = 0; w < W && only != -2; w++) {
                uint64_t x = d[w] & s[w];
                if (!x) continue;
                only = only == -1 && !(x & (x - 1)) ? 64 * w + __builtin_ctzll(x) : -2;
            }
            if (only == -1) continue;
        }
        int pending = 0;
        for (int k = t->sm_wit[j]; k < t->sm_wit[j + 1] && !pending; k++) {
            if (meets(t->wit_a + (int64_t)k * W, s, W)) continue;
            pending = t->wit_b[k] == t->wit_b[k + 1];
            for (int b = t->wit_b[k]; b < t->wit_b[k + 1] && !pending; b++)
                pending = !meets(t->wit_bmask + (int64_t)b * W, s, W);
        }
        if (!pending) continue;
        base += t->sm_size[j];
        if (only >= 0) {
            if (!minus[only]) touched[(*nt)++] = only;
            minus[only] += t->sm_size[j];
        }
    }
    return base;
}

/* Backward children of state i: the set less one unit that may run last, under the limit (a tight
 * step also with the small buffers certainly resident, schedule_guide's module docstring). */
static int shrink_one(Work *w, int64_t i) {
    const Tables *t = w->t;
    const Layer *cur = w->cur;
    int W = t->W;
    const uint64_t *s = cur->set + i * W, *rd = cur->ready + i * W;
    int64_t small = -1;  /* forced(...) once needed */
    int nt = 0;
    int status = 0;
    for (int x = 0; x < W && !status; x++) for (uint64_t b = rd[x]; b && !status; b &= b - 1) {
        int u = 64 * x + __builtin_ctzll(b);
        int64_t dp, dm;
        if (delta(t, u, s, &dp, &dm)) { status = FAILED; break; }
        int64_t before = cur->mem[i] - dm, step = before + dp;
        if (step >= w->limit) continue;
        if (t->sm_n && w->limit - step <= t->sm_large) {
            if (small < 0) small = forced(t, s, w->minus, w->touched, &nt);
            step += small - (t->sm_single[u] ? 0 : w->minus[u]);
            if (step >= w->limit) continue;
        }
        memcpy(w->child, s, (size_t)W * 8);
        w->child[u >> 6] ^= 1ULL << (u & 63);
        last_after(t, rd, w->child, u, w->ready);
        int64_t high = step > cur->meta[i].peak ? step : cur->meta[i].peak;  /* the child's least highest step */
        if (add(&w->out, W, w->child, w->ready, cur->key[i] ^ t->zob[u], 0, high, before, NONE, NONE, NONE, 0, 0))
            status = FAILED;
    }
    for (int k = 0; k < nt; k++) w->minus[w->touched[k]] = 0;
    return status;
}

static int backward_mode;  /* set per call: which expansion the workers run (calls are not concurrent) */

static void *run_work(void *arg) {
    Work *w = arg;
    w->status = 0;
    for (int64_t i = w->lo; i < w->hi && !w->status; i++) {
        if ((i & 1023) == 0 && now() > w->end) w->status = GAVE_UP;
        else w->status = backward_mode ? shrink_one(w, i) : expand_one(w, i);
    }
    return NULL;
}

/* Expand the layer `cur` into work[0].out with up to THREADS threads, merging their tables. */
static int expand_layer(Work *work, const Layer *cur) {
    int k = cur->n >= split_from ? THREADS : 1;
    pthread_t tid[THREADS];
    int started[THREADS] = {0};
    for (int j = 0; j < k; j++) {
        work[j].cur = cur;
        work[j].lo = cur->n * j / k;
        work[j].hi = cur->n * (j + 1) / k;
        clear(&work[j].out, cur->n / k);
    }
    for (int j = 1; j < k; j++) started[j] = !pthread_create(&tid[j], NULL, run_work, &work[j]);
    run_work(&work[0]);
    for (int j = 1; j < k; j++) {
        if (started[j]) pthread_join(tid[j], NULL);
        else run_work(&work[j]);
    }
    for (int j = 0; j < k; j++)
        if (work[j].status) return work[j].status;
    int W = work[0].t->W;
    for (int j = 1; j < k; j++) {  /* merge: the same sets, peaks and tags as one table would hold */
        const Layer *o = &work[j].out;
        for (int64_t x = 0; x < o->n; x++)
            if (add(&work[0].out, W, o->set + x * W, o->ready + x * W, o->key[x], o->rkey[x], o->meta[x].peak,
                    o->mem[x], o->meta[x].q0, o->meta[x].q1, o->meta[x].after, o->meta[x].parent, o->meta[x].unit))
                return FAILED;
    }
    return 0;
}

/* Forward search from the empty set (resident bytes mem0), every step under `limit`, peaks under
 * `floor` counted as `floor`. Writes the unit order to `order` and its peak to *best when OPTIMAL;
 * *stored: states stored. */
int forward(const Tables *t, int64_t limit, int64_t floor, int64_t mem0, int64_t cap, double seconds,
            int16_t *order, int64_t *best, int64_t *stored) {
    int m = t->m, W = t->W;
    Layer cur = {0};
    Work work[THREADS];
    int16_t **hu = calloc(m + 1, sizeof *hu);
    int32_t **hp = calloc(m + 1, sizeof *hp);
    int status = OPTIMAL, ok = 1;
    for (int j = 0; j < THREADS; j++) {
        ok &= !work_init(&work[j], t);
        work[j].limit = limit;
        work[j].end = now() + seconds;
    }
    backward_mode = 0;
    *stored = 1;
    if (!ok || !hu || !hp || layer_reserve(&cur, 1, W)) { status = FAILED; goto done; }
    cur.n = 1;
    memset(cur.set, 0, (size_t)W * 8);
    memset(cur.ready, 0, (size_t)W * 8);
    for (int u = 0; u < m; u++)
        if (subset(t->pred + (int64_t)u * W, cur.set, W)) cur.ready[u >> 6] |= 1ULL << (u & 63);
    cur.key[0] = cur.rkey[0] = 0; cur.mem[0] = mem0;
    cur.meta[0] = (Meta){floor, 0, 0, NONE, NONE, NONE};
    if (t->ukey && !admits(t, 0)) { status = NO_BETTER; goto done; }
    for (int k = 0; k < m; k++) {
        if ((status = expand_layer(work, &cur))) goto done;
        Layer *next = &work[0].out;
        *stored += next->n;
        hu[k] = malloc((size_t)(next->n + 1) * sizeof(int16_t));
        hp[k] = malloc((size_t)(next->n + 1) * sizeof(int32_t));
        if (!hu[k] || !hp[k]) { status = FAILED; goto done; }
        for (int64_t x = 0; x < next->n; x++) {
            hu[k][x] = next->meta[x].unit;
            hp[k][x] = next->meta[x].parent;
        }
        Layer tmp = cur; cur = *next; *next = tmp;
        if (!cur.n) { status = NO_BETTER; goto done; }
        if (*stored > cap) { status = GAVE_UP; goto done; }
    }
    *best = cur.meta[0].peak;
    for (int k = m - 1, at = 0; k >= 0; k--) {
        order[k] = hu[k][at];
        at = hp[k][at];
    }
done:
    for (int k = 0; k <= m && hu && hp; k++) { free(hu[k]); free(hp[k]); }
    free(hu); free(hp);
    for (int j = 0; j < THREADS; j++) work_free(&work[j]);
    layer_free(&cur);
    return status;
}

/* Backward search from the full set (resident bytes mem_full): every set from which all units can be
 * finished with every step under `limit`. Writes their keys to `keys` and the least highest step of
 * their completions to `highs` (room for cap + 1 each); returns how many, or -GAVE_UP past the
 * deadline or `cap`, -FAILED on failure. */
int64_t backward(const Tables *t, int64_t limit, int64_t mem_full, int64_t cap, double seconds, uint64_t *keys,
                 int64_t *highs) {
    int m = t->m, W = t->W;
    Layer cur = {0};
    Work work[THREADS];
    int64_t found = 0, status = 0, ok = 1;
    for (int j = 0; j < THREADS; j++) {
        ok &= !work_init(&work[j], t);
        work[j].limit = limit;
        work[j].end = now() + seconds;
    }
    backward_mode = 1;
    if (!ok || layer_reserve(&cur, 1, W)) { status = -FAILED; goto done; }
    cur.n = 1;
    memset(cur.set, 0, (size_t)W * 8);
    memset(cur.ready, 0, (size_t)W * 8);
    uint64_t key = 0;
    for (int u = 0; u < m; u++) {
        cur.set[u >> 6] |= 1ULL << (u & 63);
        key ^= t->zob[u];
    }
    for (int u = 0; u < m; u++)  /* `ready` of a backward state: its units that may run last */
        if (!meets(t->succ + (int64_t)u * W, cur.set, W)) cur.ready[u >> 6] |= 1ULL << (u & 63);
    cur.key[0] = key; cur.mem[0] = mem_full;
    cur.meta[0] = (Meta){INT64_MIN, 0, 0, NONE, NONE, NONE};
    highs[found] = INT64_MIN;
    keys[found++] = key;
    for (int k = 0; k < m; k++) {
        int got = expand_layer(work, &cur);
        if (got) { status = -got; goto done; }
        Layer *next = &work[0].out;
        if (found + next->n > cap) { status = -GAVE_UP; goto done; }
        memcpy(keys + found, next->key, (size_t)next->n * 8);
        for (int64_t x = 0; x < next->n; x++) highs[found + x] = next->meta[x].peak;
        found += next->n;
        Layer tmp = cur; cur = *next; *next = tmp;
        if (!cur.n) break;
    }
    status = found;
done:
    for (int j = 0; j < THREADS; j++) work_free(&work[j]);
    layer_free(&cur);
    return status;
}

/* A guide's Bloom table (schedule_guide.Guide): bit key >> shift set for each of the n keys whose
 * high is under `below`. */
void bloom(const uint64_t *keys, const int64_t *highs, int64_t n, int64_t below, uint64_t *table, uint64_t shift) {
    for (int64_t i = 0; i < n; i++) {
        if (highs[i] >= below) continue;
        uint64_t at = keys[i] >> shift;
        table[at >> 6] |= 1ULL << (at & 63);
    }
}

/* The n keys and their highs in an open-addressing table (schedule_guide.RelaxedGuides.highs_of):
 * slot entry (fingerprint << 32) | (high - base), the fingerprint the key's low 32 bits with bit 0 set
 * (0: an empty slot), high - base clipped to [0, 2^32 - 1]; `slots` a power of two above n, home key >> shift.
 * Equal fingerprints from one home on keep the least high. */
void high_table(const uint64_t *keys, const int64_t *highs, int64_t n, int64_t base, uint64_t *table,
                int64_t slots, uint64_t shift) {
    for (int64_t i = 0; i < n; i++) {
        int64_t v = highs[i] - base;
        uint64_t c = v < 0 ? 0 : v > (int64_t)UINT32_MAX ? UINT32_MAX : (uint64_t)v;
        uint64_t fp = (keys[i] | 1) & UINT32_MAX;
        for (int64_t at = keys[i] >> shift;; at = (at + 1) & (slots - 1)) {
            uint64_t e = table[at];
            if (!e) { table[at] = fp << 32 | c; break; }
            if (e >> 32 == fp) { if (c < (e & UINT32_MAX)) table[at] = fp << 32 | c; break; }
        }
    }
}

/* The high of each of the n keys in a high_table (base + its entry), INT64_MAX for a key not there. */
void high_lookup(const uint64_t *table, int64_t slots, uint64_t shift, int64_t base, const uint64_t *keys, int64_t n,
                 int64_t *out) {
    for (int64_t i = 0; i < n; i++) {
        uint64_t fp = (keys[i] | 1) & UINT32_MAX;
        out[i] = INT64_MAX;
        for (int64_t at = keys[i] >> shift;; at = (at + 1) & (slots - 1)) {
            uint64_t e = table[at];
            if (!e) break;
            if (e >> 32 == fp) { out[i] = base + (int64_t)(e & UINT32_MAX); break; }
        }
    }
}
