/* probe: a test guest that exercises every capability and passes its input
 * through. Not a reference function; the integration tests use it to check
 * grants, the key-value store, models and hot swap accounting.
 *
 * Stream 0: every input sample, unchanged.
 * Stream 1: one result sample per configured probe, per process call:
 *   point 0 registers=<device>:<address>:<count>   value = sum of registers
 *   point 1 node=<device>:<node-id>                value = node value
 *   point 2 point=<index>                          value = point value
 *   point 3 kv_counter=<key>   value = counter after increment (kept in kv)
 *   point 4 model=<name>                           value = model length
 * An error gives value -1 not-granted, -2 not-found, -3 unavailable,
 * -4 too-large, with quality 2. Also: counter `batches` += 1 per call,
 * and log=1 logs one info line per call. */
#include "guest.h"

static char *g_cfg;
static slice_t g_regs_dev, g_node_dev, g_node_id, g_kv_key, g_model;
static double g_regs_addr, g_regs_count, g_point = -1;
static bool g_has_regs, g_has_node, g_has_point, g_has_kv, g_has_model, g_log;
static outbuf_t g_pass, g_res;

static bool split(slice_t v, slice_t *a, slice_t *rest) {
    size_t i = 0;
    while (i < v.len && v.ptr[i] != ':') i++;
    if (i == v.len) return false;
    *a = (slice_t){v.ptr, i};
    *rest = (slice_t){v.ptr + i + 1, v.len - i - 1};
    return true;
}

bool exports_device_function_init(device_function_string_t *config, device_function_string_t *err) {
    /* Keep the config: the slices below point into it. */
    g_cfg = (char *)config->ptr;
    slice_t cfg = {g_cfg, config->len};
    slice_t k, v, a, rest;
    while (cfg_next(&cfg, &k, &v)) {
        if (slice_eq(k, "registers")) {
            slice_t addr, cnt;
            if (!split(v, &a, &rest) || !split(rest, &addr, &cnt) || !parse_f64(addr, &g_regs_addr) ||
                !parse_f64(cnt, &g_regs_count))
                return fail(err, "registers=<device>:<address>:<count>");
            g_regs_dev = a;
            g_has_regs = true;
        } else if (slice_eq(k, "node")) {
            if (!split(v, &a, &rest)) return fail(err, "node=<device>:<node-id>");
            g_node_dev = a;
            g_node_id = rest;
            g_has_node = true;
        } else if (slice_eq(k, "point")) {
            if (!parse_f64(v, &g_point)) return fail(err, "point=<index>");
            g_has_point = true;
        } else if (slice_eq(k, "kv_counter")) {
            g_kv_key = v;
            g_has_kv = true;
        } else if (slice_eq(k, "model")) {
            g_model = v;
            g_has_model = true;
        } else if (slice_eq(k, "log")) {
            g_log = slice_eq(v, "1");
        } else return fail(err, "unknown config key");
    }
    return true;
}

static double code(edgefleet_device_types_capability_error_t *e) {
    double c;
    switch (e->tag) {
    case EDGEFLEET_DEVICE_TYPES_CAPABILITY_ERROR_NOT_GRANTED: c = -1; break;
    case EDGEFLEET_DEVICE_TYPES_CAPABILITY_ERROR_NOT_FOUND: c = -2; break;
    case EDGEFLEET_DEVICE_TYPES_CAPABILITY_ERROR_UNAVAILABLE: c = -3; break;
    default: c = -4; break;
    }
    edgefleet_device_types_capability_error_free(e);
    return c;
}

static device_function_string_t wstr(slice_t s) {
    return (device_function_string_t){(uint8_t *)s.ptr, s.len};
}

static void result(uint32_t probe, uint64_t ts, double v) {
    out_push(&g_res, probe, ts, v, v < 0 ? 2 : 0);
}

static void run_probes(uint64_t ts) {
    edgefleet_device_types_capability_error_t e;
    if (g_has_regs) {
        device_function_string_t dev = wstr(g_regs_dev);
        device_function_list_u16_t regs;
        if (edgefleet_device_devices_read_registers(&dev, EDGEFLEET_DEVICE_DEVICES_REGISTER_KIND_HOLDING,
                                                    (uint16_t)g_regs_addr, (uint16_t)g_regs_count, &regs, &e)) {
            double sum = 0;
            for (size_t i = 0; i < regs.len; i++) sum += regs.ptr[i];
            device_function_list_u16_free(&regs);
            result(0, ts, sum);
        } else result(0, ts, code(&e));
    }
    if (g_has_node) {
        device_function_string_t dev = wstr(g_node_dev), node = wstr(g_node_id);
        double val;
        if (edgefleet_device_devices_read_node(&dev, &node, &val, &e)) result(1, ts, val);
        else result(1, ts, code(&e));
    }
    if (g_has_point) {
        edgefleet_device_types_sample_t s;
        if (edgefleet_device_points_read_point((uint32_t)g_point, &s, &e)) result(2, ts, s.value);
        else result(2, ts, code(&e));
    }
    if (g_has_kv) {
        device_function_string_t key = wstr(g_kv_key);
        device_function_option_list_u8_t got;
        uint64_t counter = 0;
        if (!edgefleet_device_kv_get(&key, &got, &e)) {
            result(3, ts, code(&e));
        } else {
            if (got.is_some && got.val.len == 8) memcpy(&counter, got.val.ptr, 8);
            if (got.is_some) device_function_list_u8_free(&got.val);
            counter++;
            device_function_list_u8_t val = {(uint8_t *)&counter, 8};
            if (edgefleet_device_kv_put(&key, &val, &e)) result(3, ts, (double)counter);
            else result(3, ts, code(&e));
        }
    }
    if (g_has_model) {
        device_function_string_t name = wstr(g_model);
        device_function_list_u8_t bytes;
        if (edgefleet_device_models_read_model(&name, &bytes, &e)) {
            result(4, ts, (double)bytes.len);
            device_function_list_u8_free(&bytes);
        } else result(4, ts, code(&e));
    }
}

bool exports_device_function_process(edgefleet_device_types_batch_t *b, device_function_string_t *err) {
    size_t n = b->points.len;
    bool ok = true;
    if (!out_reserve(&g_pass, n) || !out_reserve(&g_res, 8)) { ok = fail(err, "out of memory"); goto done; }
    for (size_t i = 0; i < n; i++)
        out_push(&g_pass, b->points.ptr[i], b->timestamps.ptr[i], b->values.ptr[i], b->qualities.ptr[i]);
    run_probes(n ? b->timestamps.ptr[0] : 0);
    device_function_string_t name = {(uint8_t *)"batches", 7};
    edgefleet_device_metrics_counter_add(&name, 1);
    if (g_log) {
        device_function_string_t msg = {(uint8_t *)"probe: batch processed", 22};
        edgefleet_device_log_log(EDGEFLEET_DEVICE_LOG_LEVEL_INFO, &msg);
    }
    ok = out_emit(&g_pass, 0, err) && out_emit(&g_res, 1, err);
done:
    edgefleet_device_types_batch_free(b);
    return ok;
}

bool exports_device_function_tick(uint64_t now, device_function_string_t *err) {
    (void)now;
    (void)err;
    return true;
}

bool exports_device_function_flush(device_function_string_t *err) {
    (void)err;
    return true;
}
