/* Shared helpers for the edgefleet reference guests: config parsing,
 * growable per-point state and an output buffer that emits one columnar
 * batch per stream. Header-only; each guest includes it once. */
#ifndef EDGEFLEET_GUEST_H
#define EDGEFLEET_GUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "device_function.h"

/* wit-bindgen's C output force-links its *_component_type.o; the WIT is
 * embedded by the componentize step instead, so satisfy the reference. */
void __component_type_object_force_link_device_function(void) {}

/* ---- errors returned to the host ------------------------------------ */

static bool fail(device_function_string_t *err, const char *msg) {
    device_function_string_dup(err, msg);
    return false;
}

/* ---- config: "key=value" pairs separated by ';', ',' or newlines ---- */

typedef struct {
    const char *ptr;
    size_t len;
} slice_t;

static bool slice_eq(slice_t s, const char *lit) {
    size_t n = strlen(lit);
    return s.len == n && memcmp(s.ptr, lit, n) == 0;
}

static bool is_sep(char c) { return c == ';' || c == ',' || c == '\n' || c == '\r'; }
static bool is_space(char c) { return c == ' ' || c == '\t'; }

static slice_t trim(slice_t s) {
    while (s.len && is_space(s.ptr[0])) { s.ptr++; s.len--; }
    while (s.len && is_space(s.ptr[s.len - 1])) s.len--;
    return s;
}

/* Iterates over the pairs of `cfg`. Returns false at the end. */
static bool cfg_next(slice_t *cfg, slice_t *key, slice_t *val) {
    while (cfg->len) {
        size_t i = 0;
        while (i < cfg->len && !is_sep(cfg->ptr[i])) i++;
        slice_t item = trim((slice_t){cfg->ptr, i});
        cfg->ptr += i;
        cfg->len -= i;
        if (cfg->len) { cfg->ptr++; cfg->len--; }
        if (!item.len || item.ptr[0] == '#') continue;
        size_t eq = 0;
        while (eq < item.len && item.ptr[eq] != '=') eq++;
        *key = trim((slice_t){item.ptr, eq});
        *val = eq < item.len ? trim((slice_t){item.ptr + eq + 1, item.len - eq - 1})
                             : (slice_t){item.ptr + item.len, 0};
        return true;
    }
    return false;
}

/* Parses a finite number; false if `s` is not entirely a number. */
static bool parse_f64(slice_t s, double *out) {
    char buf[64];
    if (s.len == 0 || s.len >= sizeof buf) return false;
    memcpy(buf, s.ptr, s.len);
    buf[s.len] = 0;
    char *end = NULL;
    double v = strtod(buf, &end);
    if (end != buf + s.len || v != v || v > 1e308 || v < -1e308) return false;
    *out = v;
    return true;
}

/* ---- per-point state arrays ------------------------------------------ */

/* Ensures `*arr` (of `*cap` elements of `size` bytes) holds index `idx`;
 * new elements are zeroed. Returns false when out of memory. */
__attribute__((unused)) static bool grow(void **arr, size_t *cap, size_t idx, size_t size) {
    if (idx < *cap) return true;
    size_t ncap = *cap ? *cap : 16;
    while (ncap <= idx) ncap *= 2;
    void *n = realloc(*arr, ncap * size);
    if (!n) return false;
    memset((char *)n + *cap * size, 0, (ncap - *cap) * size);
    *arr = n;
    *cap = ncap;
    return true;
}

/* ---- output buffer ---------------------------------------------------- */

typedef struct {
    uint32_t *points;
    uint64_t *timestamps;
    double *values;
    uint8_t *qualities;
    size_t len, cap;
} outbuf_t;

static bool out_reserve(outbuf_t *o, size_t extra) {
    if (o->len + extra <= o->cap) return true;
    size_t ncap = o->cap ? o->cap : 256;
    while (ncap < o->len + extra) ncap *= 2;
    uint32_t *p = realloc(o->points, ncap * sizeof *p);
    if (!p) return false;
    o->points = p;
    uint64_t *t = realloc(o->timestamps, ncap * sizeof *t);
    if (!t) return false;
    o->timestamps = t;
    double *v = realloc(o->values, ncap * sizeof *v);
    if (!v) return false;
    o->values = v;
    uint8_t *q = realloc(o->qualities, ncap * sizeof *q);
    if (!q) return false;
    o->qualities = q;
    o->cap = ncap;
    return true;
}

/* Appends a sample; the caller reserved room first. */
static inline void out_push(outbuf_t *o, uint32_t point, uint64_t ts, double v, uint8_t q) {
    size_t i = o->len++;
    o->points[i] = point;
    o->timestamps[i] = ts;
    o->values[i] = v;
    o->qualities[i] = q;
}

/* Emits the buffer on `stream` and empties it. */
static bool out_emit(outbuf_t *o, uint32_t stream, device_function_string_t *err) {
    if (o->len == 0) return true;
    edgefleet_device_types_batch_t b = {
        .points = {o->points, o->len},
        .timestamps = {o->timestamps, o->len},
        .values = {o->values, o->len},
        .qualities = {o->qualities, o->len},
    };
    edgefleet_device_types_capability_error_t cerr;
    bool ok = edgefleet_device_output_emit(stream, &b, &cerr);
    o->len = 0;
    if (!ok) {
        edgefleet_device_types_capability_error_free(&cerr);
        return fail(err, "emit refused");
    }
    return true;
}

#endif
