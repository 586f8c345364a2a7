/* window: min / max / mean / count per point over tumbling windows.
 *
 * Windows are aligned to multiples of window_ms since the Unix epoch. A
 * window closes when a sample of the same point arrives at or after its
 * end, or when tick(now) reaches its end. On close it emits one sample per
 * statistic, timestamped with the window start:
 *   stream 0: min, stream 1: max, stream 2: mean, stream 3: count.
 * The emitted quality is the worst quality seen in the window. Samples
 * older than the open window are counted in the `late_samples` counter
 * and dropped. flush() closes open windows early with quality uncertain
 * (1) unless already worse.
 *
 * Config: window_ms=<ms> (required, > 0). */
#include "guest.h"

typedef struct {
    uint64_t start;
    double min, max, sum;
    uint64_t count;
    uint8_t worst_q;
} window_t;

static uint64_t g_window;
static window_t *g_win;
static size_t g_cap;
static outbuf_t g_out[4];
static uint64_t g_late;

bool exports_device_function_init(device_function_string_t *config, device_function_string_t *err) {
    slice_t cfg = {(const char *)config->ptr, config->len};
    slice_t k, v;
    double num;
    while (cfg_next(&cfg, &k, &v)) {
        if (!parse_f64(v, &num)) return fail(err, "config value is not a number");
        if (slice_eq(k, "window_ms")) {
            if (num < 1) return fail(err, "window_ms must be >= 1");
            g_window = (uint64_t)num;
        } else return fail(err, "unknown config key");
    }
    if (!g_window) return fail(err, "window_ms is required");
    device_function_string_free(config);
    return true;
}

static bool reserve_all(size_t n) {
    for (int s = 0; s < 4; s++)
        if (!out_reserve(&g_out[s], n)) return false;
    return true;
}

static void close_window(window_t *w, uint32_t idx, uint8_t min_q) {
    uint8_t q = w->worst_q > min_q ? w->worst_q : min_q;
    out_push(&g_out[0], idx, w->start, w->min, q);
    out_push(&g_out[1], idx, w->start, w->max, q);
    out_push(&g_out[2], idx, w->start, w->sum / (double)w->count, q);
    out_push(&g_out[3], idx, w->start, (double)w->count, q);
    w->count = 0;
}

static bool emit_all(device_function_string_t *err) {
    for (uint32_t s = 0; s < 4; s++)
        if (!out_emit(&g_out[s], s, err)) return false;
    if (g_late) {
        edgefleet_device_metrics_counter_add(&(device_function_string_t){(uint8_t *)"late_samples", 12}, g_late);
        g_late = 0;
    }
    return true;
}

bool exports_device_function_process(edgefleet_device_types_batch_t *b, device_function_string_t *err) {
    size_t n = b->points.len;
    bool ok = true;
    if (b->timestamps.len != n || b->values.len != n || b->qualities.len != n) {
        ok = fail(err, "column lengths differ");
        goto done;
    }
    if (!reserve_all(n)) { ok = fail(err, "out of memory"); goto done; }
    for (size_t i = 0; i < n; i++) {
        uint32_t idx = b->points.ptr[i];
        if (idx >= g_cap && !grow((void **)&g_win, &g_cap, idx, sizeof *g_win)) {
            ok = fail(err, "out of memory");
            goto done;
        }
        window_t *w = &g_win[idx];
        uint64_t ts = b->timestamps.ptr[i];
        double v = b->values.ptr[i];
        uint8_t q = b->qualities.ptr[i];
        uint64_t start = ts - ts % g_window;
        if (w->count) {
            if (start < w->start) { g_late++; continue; }
            if (start > w->start) close_window(w, idx, 0);
        }
        if (!w->count) {
            w->start = start;
            w->min = w->max = v;
            w->sum = 0;
            w->worst_q = q;
        }
        if (v < w->min) w->min = v;
        if (v > w->max) w->max = v;
        if (q > w->worst_q) w->worst_q = q;
        w->sum += v;
        w->count++;
    }
    ok = emit_all(err);
done:
    edgefleet_device_types_batch_free(b);
    return ok;
}

static bool close_due(bool all, uint64_t now, device_function_string_t *err) {
    if (!reserve_all(g_cap)) return fail(err, "out of memory");
    for (size_t idx = 0; idx < g_cap; idx++) {
        window_t *w = &g_win[idx];
        if (!w->count) continue;
        if (all) close_window(w, (uint32_t)idx, 1);
        else if (now >= w->start + g_window) close_window(w, (uint32_t)idx, 0);
    }
    return emit_all(err);
}

bool exports_device_function_tick(uint64_t now, device_function_string_t *err) {
    return close_due(false, now, err);
}

bool exports_device_function_flush(device_function_string_t *err) {
    return close_due(true, 0, err);
}
