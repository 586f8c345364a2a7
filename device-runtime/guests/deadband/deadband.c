/* deadband: report-by-exception with OPC UA DataChangeFilter semantics.
 *
 * A sample passes when
 *   - it is the first one of its point, or
 *   - its quality differs from the last passed sample (status change), or
 *   - its value or the last passed value is not finite and they differ, or
 *   - |value - last passed value| > deadband, or
 *   - max_interval_ms > 0 and it is at least max_interval_ms younger than
 *     the last passed sample (heartbeat).
 * tick(now) also sends a heartbeat: the newest held-back sample of a point
 * whose last passed sample is max_interval_ms old.
 *
 * Config (key=value, separated by ';'):
 *   mode=absolute|percent   (default absolute)
 *   deadband=<abs>          absolute deadband, engineering units
 *   percent=<p>             percent of range (mode=percent)
 *   range_low=<lo>, range_high=<hi>   EURange for percent mode
 *   max_interval_ms=<ms>    heartbeat, 0 = off (default 0)
 * Output stream 0: the passed samples. */
#include <math.h>

#include "guest.h"

typedef struct {
    uint64_t sent_ts, held_ts;
    double sent_v, held_v;
    uint8_t sent_q, held_q;
    uint8_t has_sent, has_held; /* has_held: a newer sample was dropped */
} point_t;

static double g_deadband;
static uint64_t g_max_interval;
static point_t *g_points;
static size_t g_cap;
static outbuf_t g_out;

bool exports_device_function_init(device_function_string_t *config, device_function_string_t *err) {
    slice_t cfg = {(const char *)config->ptr, config->len};
    slice_t k, v;
    bool percent = false, have_db = false, have_pct = false;
    double db = 0, pct = 0, lo = 0, hi = 0, num;
    while (cfg_next(&cfg, &k, &v)) {
        if (slice_eq(k, "mode")) {
            if (slice_eq(v, "percent")) percent = true;
            else if (slice_eq(v, "absolute")) percent = false;
            else return fail(err, "mode must be absolute or percent");
            continue;
        }
        if (!parse_f64(v, &num)) return fail(err, "config value is not a number");
        if (slice_eq(k, "deadband")) { db = num; have_db = true; }
        else if (slice_eq(k, "percent")) { pct = num; have_pct = true; }
        else if (slice_eq(k, "range_low")) lo = num;
        else if (slice_eq(k, "range_high")) hi = num;
        else if (slice_eq(k, "max_interval_ms")) {
            if (num < 0) return fail(err, "max_interval_ms must be >= 0");
            g_max_interval = (uint64_t)num;
        } else return fail(err, "unknown config key");
    }
    if (percent) {
        if (!have_pct || pct < 0 || pct > 100) return fail(err, "percent must be in 0..100");
        if (!(hi > lo)) return fail(err, "range_high must exceed range_low");
        g_deadband = pct / 100.0 * (hi - lo);
    } else {
        if (!have_db || db < 0) return fail(err, "deadband must be >= 0");
        g_deadband = db;
    }
    device_function_string_free(config);
    return true;
}

static inline bool passes(const point_t *p, uint64_t ts, double v, uint8_t q) {
    if (!p->has_sent || q != p->sent_q) return true;
    if (!isfinite(v) || !isfinite(p->sent_v)) return !(v == p->sent_v) ;
    if (fabs(v - p->sent_v) > g_deadband) return true;
    return g_max_interval && ts >= p->sent_ts && ts - p->sent_ts >= g_max_interval;
}

bool exports_device_function_process(edgefleet_device_types_batch_t *b, device_function_string_t *err) {
    size_t n = b->points.len;
    bool ok = true;
    if (b->timestamps.len != n || b->values.len != n || b->qualities.len != n) {
        ok = fail(err, "column lengths differ");
        goto done;
    }
    if (!out_reserve(&g_out, n)) { ok = fail(err, "out of memory"); goto done; }
    const uint32_t *pts = b->points.ptr;
    const uint64_t *tss = b->timestamps.ptr;
    const double *vals = b->values.ptr;
    const uint8_t *qs = b->qualities.ptr;
    for (size_t i = 0; i < n; i++) {
        uint32_t idx = pts[i];
        if (idx >= g_cap && !grow((void **)&g_points, &g_cap, idx, sizeof *g_points)) {
            ok = fail(err, "out of memory");
            goto done;
        }
        point_t *p = &g_points[idx];
        if (passes(p, tss[i], vals[i], qs[i])) {
            p->sent_ts = tss[i];
            p->sent_v = vals[i];
            p->sent_q = qs[i];
            p->has_sent = 1;
            p->has_held = 0;
            out_push(&g_out, idx, tss[i], vals[i], qs[i]);
        } else {
            p->held_ts = tss[i];
            p->held_v = vals[i];
            p->held_q = qs[i];
            p->has_held = 1;
        }
    }
    ok = out_emit(&g_out, 0, err);
done:
    edgefleet_device_types_batch_free(b);
    return ok;
}

bool exports_device_function_tick(uint64_t now, device_function_string_t *err) {
    if (!g_max_interval) return true;
    for (size_t idx = 0; idx < g_cap; idx++) {
        point_t *p = &g_points[idx];
        if (!p->has_held || now < p->sent_ts || now - p->sent_ts < g_max_interval) continue;
        if (!out_reserve(&g_out, 1)) return fail(err, "out of memory");
        out_push(&g_out, (uint32_t)idx, p->held_ts, p->held_v, p->held_q);
        p->sent_ts = p->held_ts;
        p->sent_v = p->held_v;
        p->sent_q = p->held_q;
        p->has_held = 0;
    }
    return out_emit(&g_out, 0, err);
}

/* Nothing is held back that matters: dropped samples are within the
 * deadband of what was sent. */
bool exports_device_function_flush(device_function_string_t *err) {
    (void)err;
    return true;
}
