/* swinging-door: historian compression (as in PI's compression deviation
 * and CompMax), strict variant.
 *
 * Per point it keeps the last emitted ("archived") sample A, the newest
 * received sample H (held, not yet emitted) and the slope interval
 * [lo, hi] of lines from A that pass within `deviation` of every sample
 * received after A. A new sample P becomes the new held sample when the
 * slope A->P lies in that interval (narrowed by P's own interval);
 * otherwise the door has closed: H is emitted, becomes A, and P is held.
 *
 * Guarantee (what the fidelity test checks): linear interpolation between
 * consecutive emitted samples of a point stays within `deviation` of every
 * dropped sample. The pivot is A itself (not A +/- deviation as in the
 * textbook algorithm), which is what makes the bound hold exactly.
 *
 * Always emitted: the first sample of a point, samples whose quality
 * differs from the previous one (and the held sample before them),
 * non-finite values, and out-of-order timestamps. When max_time_ms > 0, a
 * held sample is emitted once it is max_time_ms younger than A: in
 * `process` before a later sample, or in `tick(now)`.
 * `flush` emits every held sample (used before a hot swap).
 *
 * Config: deviation=<d> (required, >= 0); max_time_ms=<ms> (0 = off).
 * Output stream 0. */
#include <math.h>

#include "guest.h"

typedef struct {
    uint64_t a_ts, h_ts;
    double a_v, h_v;
    double lo, hi;
    uint8_t a_q, h_q;
    uint8_t has_a, has_h;
} point_t;

static double g_dev = -1;
static uint64_t g_max_time;
static point_t *g_points;
static size_t g_cap;
static outbuf_t g_out;

bool exports_device_function_init(device_function_string_t *config, device_function_string_t *err) {
    slice_t cfg = {(const char *)config->ptr, config->len};
    slice_t k, v;
    double num;
    while (cfg_next(&cfg, &k, &v)) {
        if (!parse_f64(v, &num)) return fail(err, "config value is not a number");
        if (slice_eq(k, "deviation")) {
            if (num < 0) return fail(err, "deviation must be >= 0");
            g_dev = num;
        } else if (slice_eq(k, "max_time_ms")) {
            if (num < 0) return fail(err, "max_time_ms must be >= 0");
            g_max_time = (uint64_t)num;
        } else return fail(err, "unknown config key");
    }
    if (g_dev < 0) return fail(err, "deviation is required");
    device_function_string_free(config);
    return true;
}

static inline void archive(point_t *p, uint32_t idx, uint64_t ts, double v, uint8_t q) {
    out_push(&g_out, idx, ts, v, q);
    p->a_ts = ts;
    p->a_v = v;
    p->a_q = q;
    p->has_a = 1;
    p->has_h = 0;
}

/* Emits the held sample, making it the archived one. */
static inline void archive_held(point_t *p, uint32_t idx) {
    archive(p, idx, p->h_ts, p->h_v, p->h_q);
}

/* Holds P as the first sample after A. */
static inline void hold_first(point_t *p, uint64_t ts, double v, uint8_t q) {
    double dt = (double)(ts - p->a_ts);
    p->lo = (v - g_dev - p->a_v) / dt;
    p->hi = (v + g_dev - p->a_v) / dt;
    p->h_ts = ts;
    p->h_v = v;
    p->h_q = q;
    p->has_h = 1;
}

static inline void step(point_t *p, uint32_t idx, uint64_t ts, double v, uint8_t q) {
    if (!p->has_a) { archive(p, idx, ts, v, q); return; }
    uint64_t last_ts = p->has_h ? p->h_ts : p->a_ts;
    uint8_t last_q = p->has_h ? p->h_q : p->a_q;
    if (q != last_q || !isfinite(v) || !isfinite(p->a_v) || ts <= last_ts) {
        if (p->has_h) archive_held(p, idx);
        archive(p, idx, ts, v, q);
        return;
    }
    if (g_max_time && p->has_h && ts - p->a_ts > g_max_time) {
        archive_held(p, idx);
    }
    if (!p->has_h) {
        if (g_max_time && ts - p->a_ts > g_max_time) { archive(p, idx, ts, v, q); return; }
        hold_first(p, ts, v, q);
        return;
    }
    double dt = (double)(ts - p->a_ts);
    double s = (v - p->a_v) / dt;
    double lo = (v - g_dev - p->a_v) / dt;
    double hi = (v + g_dev - p->a_v) / dt;
    if (lo < p->lo) lo = p->lo;
    if (hi > p->hi) hi = p->hi;
    if (lo <= s && s <= hi) {
        p->lo = lo;
        p->hi = hi;
        p->h_ts = ts;
        p->h_v = v;
        p->h_q = q;
    } else {
        archive_held(p, idx);
        hold_first(p, ts, v, q);
    }
}

bool exports_device_function_process(edgefleet_device_types_batch_t *b, device_function_string_t *err) {
    size_t n = b->points.len;
    bool ok = true;
    if (b->timestamps.len != n || b->values.len != n || b->qualities.len != n) {
        ok = fail(err, "column lengths differ");
        goto done;
    }
    /* A sample emits at most two (held + itself). */
    if (!out_reserve(&g_out, 2 * n)) { ok = fail(err, "out of memory"); goto done; }
    for (size_t i = 0; i < n; i++) {
        uint32_t idx = b->points.ptr[i];
        if (idx >= g_cap && !grow((void **)&g_points, &g_cap, idx, sizeof *g_points)) {
            ok = fail(err, "out of memory");
            goto done;
        }
        step(&g_points[idx], idx, b->timestamps.ptr[i], b->values.ptr[i], b->qualities.ptr[i]);
    }
    ok = out_emit(&g_out, 0, err);
done:
    edgefleet_device_types_batch_free(b);
    return ok;
}

static bool emit_held(bool only_due, uint64_t now, device_function_string_t *err) {
    for (size_t idx = 0; idx < g_cap; idx++) {
        point_t *p = &g_points[idx];
        if (!p->has_h) continue;
        if (only_due && (!g_max_time || now < p->a_ts || now - p->a_ts < g_max_time)) continue;
        if (!out_reserve(&g_out, 1)) return fail(err, "out of memory");
        archive_held(p, (uint32_t)idx);
    }
    return out_emit(&g_out, 0, err);
}

bool exports_device_function_tick(uint64_t now, device_function_string_t *err) {
    return emit_held(true, now, err);
}

bool exports_device_function_flush(device_function_string_t *err) {
    return emit_held(false, 0, err);
}
