/* anomaly: passes anomalous samples, drops normal ones, using a model
 * pushed over the air (read through the `models` capability at init).
 *
 * Model format (text, one rule per line, '#' comments):
 *   <point> range <low> <high>          anomaly if value < low or > high
 *   <point> zscore <mean> <std> <k>     anomaly if |value - mean| > k * std
 *   *       range|zscore ...            default for points without a rule
 * A sample also passes when its quality is not good (status matters) or
 * its value is not finite. Points with no rule and no default pass when
 * unknown=pass (default) and are dropped when unknown=drop.
 *
 * Config: model=<name> (required); unknown=pass|drop.
 * Output stream 0: passed samples. Counters: anomalies, normal. */
#include <math.h>

#include "guest.h"

enum { RULE_NONE = 0, RULE_RANGE = 1, RULE_ZSCORE = 2 };

typedef struct {
    uint8_t kind;
    double a, b; /* range: low, high; zscore: mean, k*std */
} rule_t;

static rule_t *g_rules;
static size_t g_cap;
static rule_t g_default;
static bool g_unknown_pass = true;
static outbuf_t g_out;

static bool parse_rule(slice_t line, device_function_string_t *err) {
    slice_t tok[5];
    size_t nt = 0, i = 0;
    while (i < line.len && nt < 5) {
        while (i < line.len && (is_space(line.ptr[i]))) i++;
        size_t s = i;
        while (i < line.len && !is_space(line.ptr[i])) i++;
        if (i > s) tok[nt++] = (slice_t){line.ptr + s, i - s};
    }
    while (i < line.len && is_space(line.ptr[i])) i++;
    if (i < line.len || nt < 4) return fail(err, "model: bad rule line");
    rule_t r = {0};
    double x, y, z;
    if (!parse_f64(tok[2], &x) || !parse_f64(tok[3], &y)) return fail(err, "model: bad number");
    if (slice_eq(tok[1], "range")) {
        if (nt != 4 || !(x <= y)) return fail(err, "model: range needs low <= high");
        r = (rule_t){RULE_RANGE, x, y};
    } else if (slice_eq(tok[1], "zscore")) {
        if (nt != 5 || !parse_f64(tok[4], &z) || !(y > 0) || !(z > 0))
            return fail(err, "model: zscore needs mean std>0 k>0");
        r = (rule_t){RULE_ZSCORE, x, y * z};
    } else return fail(err, "model: rule must be range or zscore");
    if (slice_eq(tok[0], "*")) { g_default = r; return true; }
    double p;
    if (!parse_f64(tok[0], &p) || p < 0 || p > 4294967295.0 || p != floor(p))
        return fail(err, "model: point must be an index or *");
    size_t idx = (size_t)p;
    if (!grow((void **)&g_rules, &g_cap, idx, sizeof *g_rules)) return fail(err, "out of memory");
    g_rules[idx] = r;
    return true;
}

static bool load_model(slice_t name, device_function_string_t *err) {
    device_function_string_t wname = {(uint8_t *)name.ptr, name.len};
    device_function_list_u8_t bytes;
    edgefleet_device_types_capability_error_t cerr;
    if (!edgefleet_device_models_read_model(&wname, &bytes, &cerr)) {
        edgefleet_device_types_capability_error_free(&cerr);
        return fail(err, "model not readable");
    }
    slice_t rest = {(const char *)bytes.ptr, bytes.len};
    bool ok = true;
    while (ok && rest.len) {
        size_t i = 0;
        while (i < rest.len && rest.ptr[i] != '\n') i++;
        slice_t line = trim((slice_t){rest.ptr, i});
        if (line.len && line.ptr[line.len - 1] == '\r') line.len--;
        rest.ptr += i;
        rest.len -= i;
        if (rest.len) { rest.ptr++; rest.len--; }
        if (!line.len || line.ptr[0] == '#') continue;
        ok = parse_rule(line, err);
    }
    device_function_list_u8_free(&bytes);
    return ok;
}

bool exports_device_function_init(device_function_string_t *config, device_function_string_t *err) {
    slice_t cfg = {(const char *)config->ptr, config->len};
    slice_t k, v, model = {0, 0};
    while (cfg_next(&cfg, &k, &v)) {
        if (slice_eq(k, "model")) model = v;
        else if (slice_eq(k, "unknown")) {
            if (slice_eq(v, "pass")) g_unknown_pass = true;
            else if (slice_eq(v, "drop")) g_unknown_pass = false;
            else return fail(err, "unknown must be pass or drop");
        } else return fail(err, "unknown config key");
    }
    if (!model.len) return fail(err, "model is required");
    bool ok = load_model(model, err);
    device_function_string_free(config);
    return ok;
}

static inline bool anomalous(uint32_t idx, double v, uint8_t q) {
    if (q != 0 || !isfinite(v)) return true;
    const rule_t *r = idx < g_cap && g_rules[idx].kind ? &g_rules[idx] : &g_default;
    switch (r->kind) {
    case RULE_RANGE: return v < r->a || v > r->b;
    case RULE_ZSCORE: return fabs(v - r->a) > r->b;
    default: return g_unknown_pass;
    }
}

static void count(const char *name, uint64_t n) {
    if (!n) return;
    device_function_string_t s = {(uint8_t *)name, strlen(name)};
    edgefleet_device_metrics_counter_add(&s, n);
}

bool exports_device_function_process(edgefleet_device_types_batch_t *b, device_function_string_t *err) {
    size_t n = b->points.len;
    bool ok = true;
    if (b->timestamps.len != n || b->values.len != n || b->qualities.len != n) {
        ok = fail(err, "column lengths differ");
        goto done;
    }
    if (!out_reserve(&g_out, n)) { ok = fail(err, "out of memory"); goto done; }
    for (size_t i = 0; i < n; i++) {
        uint32_t idx = b->points.ptr[i];
        double v = b->values.ptr[i];
        uint8_t q = b->qualities.ptr[i];
        if (anomalous(idx, v, q)) out_push(&g_out, idx, b->timestamps.ptr[i], v, q);
    }
    count("anomalies", g_out.len);
    count("normal", n - g_out.len);
    ok = out_emit(&g_out, 0, err);
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
