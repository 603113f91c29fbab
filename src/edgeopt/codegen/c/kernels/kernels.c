/* edgeopt int8 kernels; see kernels.h. Portable C99, no malloc, no float. */
#include "kernels.h"

#include <string.h>

static int32_t clamp32(int32_t x, int32_t lo, int32_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

/* x saturated to int32: a requantized value past it (a multiplier far above 1) is far past int8 too. */
static int32_t sat32(int64_t x) { return x < INT32_MIN ? INT32_MIN : (x > INT32_MAX ? INT32_MAX : (int32_t)x); }

#if !EO_SINGLE_ROUNDING
/* gemmlowp SaturatingRoundingDoublingHighMul: round(a * b / 2^31), quotient truncated toward zero. */
static int64_t srdhm(int64_t a, int64_t b) {
    int64_t product, total;
    if (a == INT32_MIN && b == INT32_MIN) return INT32_MAX;
    product = a * b;
    total = product + (product >= 0 ? ((int64_t)1 << 30) : (1 - ((int64_t)1 << 30)));
    return total >= 0 ? total >> 31 : -((-total) >> 31);
}

/* gemmlowp RoundingDivideByPOT: x / 2^exponent rounded half away from zero. */
static int64_t rdbpot(int64_t x, int exponent) {
    int64_t mask = ((int64_t)1 << exponent) - 1;
    int64_t remainder = x & mask;
    int64_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return (x >> exponent) + (remainder > threshold ? 1 : 0);
}
#endif

int32_t eo_requantize(int32_t x, int32_t multiplier, int32_t shift) {
#if EO_SINGLE_ROUNDING
    int total = 31 - shift; /* shift in [-31, 30]: the sum below stays under 2^63 */
    return sat32(((int64_t)x * multiplier + ((int64_t)1 << (total - 1))) >> total);
#else
    int left = shift > 0 ? shift : 0;
    int right = shift > 0 ? 0 : -shift;
    /* the left shift saturates to int32 first, so the doubling high multiply cannot overflow */
    return (int32_t)rdbpot(srdhm(sat32((int64_t)x * ((int64_t)1 << left)), multiplier), right);
#endif
}

static int8_t finish(int32_t acc, int32_t multiplier, int32_t shift, int32_t zero_point, int32_t lo, int32_t hi) {
    int64_t out = (int64_t)eo_requantize(acc, multiplier, shift) + zero_point; /* no int32 overflow at the edge */
    return (int8_t)(out < lo ? lo : (out > hi ? hi : out));
}

/* The taps of one output position that fall inside the input: rows ky0..ky1-1, columns kx0..kx1-1 of
 * the kernel, whose input pixel is (y + ky * dilation_h, x + kx * dilation_w) of image b; cut when the border
 * leaves some taps out. Found once per position, not per output channel and tap. */
typedef struct { long image; int y, x, ky0, ky1, kx0, kx1, cut; } eo_window;

static eo_window conv_window(const eo_conv2d_params *p, int b, int oy, int ox) {
    eo_window win;
    win.image = (long)b * p->h;
    win.y = oy * p->stride_h - p->pad_top;
    win.x = ox * p->stride_w - p->pad_left;
    win.ky0 = 0;
    while (win.ky0 < p->kernel_h && win.y + win.ky0 * p->dilation_h < 0) ++win.ky0;
    win.ky1 = p->kernel_h;
    while (win.ky1 > win.ky0 && win.y + (win.ky1 - 1) * p->dilation_h >= p->h) --win.ky1;
    win.kx0 = 0;
    while (win.kx0 < p->kernel_w && win.x + win.kx0 * p->dilation_w < 0) ++win.kx0;
    win.kx1 = p->kernel_w;
    while (win.kx1 > win.kx0 && win.x + (win.kx1 - 1) * p->dilation_w >= p->w) --win.kx1;
    win.cut = win.ky0 > 0 || win.ky1 < p->kernel_h || win.kx0 > 0 || win.kx1 < p->kernel_w;
    return win;
}

/* The int32 accumulator of output channel o at a position: bias + sum over the window of (x - zp) * w. */
/* The sum of (x - zero_point) w over the taps of o's window that fall inside the input. */
static inline int32_t window_sum(const eo_conv2d_params *p, const int8_t *in, const eo_window *win, int o,
                                 int first, int group_channels, int32_t zero_point) {
    const int8_t *weights = p->weight + (long)o * p->kernel_h * p->kernel_w * group_channels;
    int ky, kx, ic;
    int32_t acc = 0;
    for (ky = win->ky0; ky < win->ky1; ++ky) {
        const int8_t *row = in + (win->image + win->y + ky * p->dilation_h) * p->w * p->c + first;
        const int8_t *wt = weights + (long)ky * p->kernel_w * group_channels;
        for (kx = win->kx0; kx < win->kx1; ++kx) {
            const int8_t *src = row + (long)(win->x + kx * p->dilation_w) * p->c;
            const int8_t *tap = wt + (long)kx * group_channels;
            for (ic = 0; ic < group_channels; ++ic)
                acc += ((int32_t)src[ic] - zero_point) * tap[ic];
        }
    }
    return acc;
}

/* bias + the sum of (x - zp) w over o's window (o reads input channels first .. first + group_channels - 1).
 * A window inside the input takes zero_point_sums[o] = zp * (the sum of o's weights) once and multiplies the
 * int8 values alone; one the border cuts subtracts zp tap by tap (its taps outside read padding: the zero
 * point, real 0). */
static inline int32_t conv_accumulator(const eo_conv2d_params *p, const int8_t *in, const eo_window *win, int o,
                                       int first, int group_channels) {
    if (win->cut) return p->bias[o] + window_sum(p, in, win, o, first, group_channels, p->input_zero_point);
    return p->bias[o] - p->zero_point_sums[o] + window_sum(p, in, win, o, first, group_channels, 0);
}

/* A depthwise conv (one input and one output channel per group), its weights stored HWC by the generator
 * (which calls this kernel instead of eo_conv2d_s8 for such a conv, so a model without one does not link it):
 * per window, each tap multiplies a run of channels contiguous in the input and in the weights, into
 * EO_DEPTHWISE_RUN accumulators, instead of one channel's taps at a time. */
#define EO_DEPTHWISE_RUN 32
void eo_depthwise_conv2d_s8(const eo_conv2d_params *params, const int8_t *in, int8_t *out) {
    const eo_conv2d_params copy = *params, *p = &copy; /* a copy: see eo_conv2d_s8 */
    int32_t acc[EO_DEPTHWISE_RUN];
    int b, oy, ox, c0, j, ky, kx;
    for (b = 0; b < p->n; ++b)
        for (oy = 0; oy < p->out_h; ++oy)
            for (ox = 0; ox < p->out_w; ++ox) {
                eo_window win = conv_window(p, b, oy, ox);
                int8_t *dst = out + (((long)b * p->out_h + oy) * p->out_w + ox) * p->out_c;
                int32_t zero_point = win.cut ? p->input_zero_point : 0;
                for (c0 = 0; c0 < p->c; c0 += EO_DEPTHWISE_RUN) {
                    int run = p->c - c0 < EO_DEPTHWISE_RUN ? p->c - c0 : EO_DEPTHWISE_RUN;
                    for (j = 0; j < run; ++j)
                        acc[j] = p->bias[c0 + j] - (win.cut ? 0 : p->zero_point_sums[c0 + j]);
                    for (ky = win.ky0; ky < win.ky1; ++ky)
                        for (kx = win.kx0; kx < win.kx1; ++kx) {
                            const int8_t *src = in + ((win.image + win.y + ky * p->dilation_h) * p->w
                                                      + win.x + kx * p->dilation_w) * p->c + c0;
                            const int8_t *tap = p->weight + ((long)ky * p->kernel_w + kx) * p->c + c0;
                            for (j = 0; j < run; ++j) acc[j] += ((int32_t)src[j] - zero_point) * tap[j];
                        }
                    for (j = 0; j < run; ++j)
                        dst[c0 + j] = finish(acc[j], p->multiplier[c0 + j], p->shift[c0 + j], p->output_zero_point,
                                             p->act_min, p->act_max);
                }
            }
}

void eo_fully_connected_s8(const eo_fully_connected_params *p, const int8_t *in, int8_t *out) {
    int r, o, k;
    for (r = 0; r < p->rows; ++r)
        for (o = 0; o < p->out_features; ++o) {
            const int8_t *x = in + (long)r * p->depth, *wt = p->weight + (long)o * p->depth;
            int32_t acc = p->bias[o];
            for (k = 0; k < p->depth; ++k) acc += (int32_t)x[k] * wt[k]; /* bias has -zp * sum(wt) folded in */
            out[(long)r * p->out_features + o] =
                finish(acc, p->multiplier[o], p->shift[o], p->output_zero_point, p->act_min, p->act_max);
        }
}

#define EO_FOR4(shape) \
    for (i0 = 0; i0 < (shape)[0]; ++i0) for (i1 = 0; i1 < (shape)[1]; ++i1) \
    for (i2 = 0; i2 < (shape)[2]; ++i2) for (i3 = 0; i3 < (shape)[3]; ++i3)
#define EO_AT(s) (i0 * (s)[0] + i1 * (s)[1] + i2 * (s)[2] + i3 * (s)[3])

/* TFLite's quantized add of one pair: both moved to a common scale with left_shift headroom, then requantized. */
static int8_t add_pair(const eo_add_params *p, int8_t a, int8_t b) {
    int32_t x = ((int32_t)a - p->a_zero_point) * (1 << p->left_shift);
    int32_t y = ((int32_t)b - p->b_zero_point) * (1 << p->left_shift);
    int32_t sum = eo_requantize(x, p->a_multiplier, p->a_shift) + eo_requantize(y, p->b_multiplier, p->b_shift);
    return finish(sum, p->output_multiplier, p->output_shift, p->output_zero_point, p->act_min, p->act_max);
}

void eo_add_s8(const eo_add_params *p, const int8_t *a, const int8_t *b, int8_t *out) {
    int i0, i1, i2, i3;
    long index = 0;
    EO_FOR4(p->shape) {
        int8_t x = a[EO_AT(p->a_stride)], y = b[EO_AT(p->b_stride)];
        out[index++] = add_pair(p, x, y);
    }
}

/* Every output of a conv, and with `add` the residual Add of `shortcut` at the same place (out may be shortcut,
 * in place: element (b, oy, ox, o) of shortcut is read just before that element of out is written, and the conv
 * reads only in). It works on copies of the parameters: the int8 stores could otherwise alias them (a char
 * type aliases anything), and every field would be read again after each output. */
static void conv_outputs(const eo_conv2d_params *params, const eo_add_params *add, const int8_t *in,
                         const int8_t *shortcut, int8_t *out) {
    const eo_conv2d_params p = *params;
    const eo_add_params residual = add ? *add : (eo_add_params){0};
    const int group_channels = p.c / p.group, per_group = p.out_c / p.group;
    int b, oy, ox, g, j;
    for (b = 0; b < p.n; ++b)
        for (oy = 0; oy < p.out_h; ++oy)
            for (ox = 0; ox < p.out_w; ++ox) {
                eo_window win = conv_window(&p, b, oy, ox);
                long base = (((long)b * p.out_h + oy) * p.out_w + ox) * p.out_c;
                for (g = 0; g < p.group; ++g)
                    for (j = 0; j < per_group; ++j) {
                        int o = g * per_group + j;
                        int8_t t = finish(conv_accumulator(&p, in, &win, o, g * group_channels, group_channels),
                                          p.multiplier[o], p.shift[o], p.output_zero_point, p.act_min, p.act_max);
                        out[base + o] = add ? add_pair(&residual, t, shortcut[base + o]) : t;
                    }
            }
}

void eo_conv2d_s8(const eo_conv2d_params *params, const int8_t *in, int8_t *out) {
    conv_outputs(params, 0, in, 0, out);
}

void eo_conv2d_add_s8(const eo_conv2d_add_params *params, const int8_t *in, const int8_t *shortcut, int8_t *out) {
    conv_outputs(&params->conv, &params->add, in, shortcut, out);
}

void eo_mul_s8(const eo_mul_params *p, const int8_t *a, const int8_t *b, int8_t *out) {
    int i0, i1, i2, i3;
    long index = 0;
    EO_FOR4(p->shape) {
        int32_t product = ((int32_t)a[EO_AT(p->a_stride)] - p->a_zero_point)
                        * ((int32_t)b[EO_AT(p->b_stride)] - p->b_zero_point);
        out[index++] = finish(product, p->output_multiplier, p->output_shift, p->output_zero_point,
                              p->act_min, p->act_max);
    }
}

void eo_max_pool_s8(const eo_max_pool_params *p, const int8_t *in, int8_t *out) {
    int b, oy, ox, ch, ky, kx;
    for (b = 0; b < p->n; ++b)
        for (oy = 0; oy < p->out_h; ++oy)
            for (ox = 0; ox < p->out_w; ++ox)
                for (ch = 0; ch < p->c; ++ch) {
                    int32_t best = -1000000;
                    for (ky = 0; ky < p->kernel_h; ++ky) {
                        int y = oy * p->stride_h - p->pad_top + ky;
                        if (y < 0 || y >= p->h) continue;
                        for (kx = 0; kx < p->kernel_w; ++kx) {
                            int x = ox * p->stride_w - p->pad_left + kx;
                            int32_t v;
                            if (x < 0 || x >= p->w) continue;
                            v = in[(((long)b * p->h + y) * p->w + x) * p->c + ch];
                            if (v > best) best = v;
                        }
                    }
                    out[(((long)b * p->out_h + oy) * p->out_w + ox) * p->c + ch] =
                        (int8_t)clamp32(best, p->act_min, p->act_max);
                }
}

void eo_avg_pool_s8(const eo_avg_pool_params *p, const int8_t *in, int8_t *out) {
    int b, oy, ox, ch, ky, kx;
    for (b = 0; b < p->n; ++b)
        for (oy = 0; oy < p->out_h; ++oy)
            for (ox = 0; ox < p->out_w; ++ox)
                for (ch = 0; ch < p->c; ++ch) {
                    int32_t sum = 0, count = 0;
                    for (ky = 0; ky < p->kernel_h; ++ky) {
                        int y = oy * p->stride_h - p->pad_top + ky;
                        if (y < 0 || y >= p->h) continue;
                        for (kx = 0; kx < p->kernel_w; ++kx) {
                            int x = ox * p->stride_w - p->pad_left + kx;
                            if (x < 0 || x >= p->w) continue;
                            sum += (int32_t)in[(((long)b * p->h + y) * p->w + x) * p->c + ch] - p->input_zero_point;
                            ++count;
                        }
                    }
                    if (p->count_include_pad) count = p->kernel_h * p->kernel_w;
                    out[(((long)b * p->out_h + oy) * p->out_w + ox) * p->c + ch] =
                        finish(sum, p->multiplier[count], p->shift[count], p->output_zero_point,
                               p->act_min, p->act_max);
                }
}

void eo_mean_s8(const eo_mean_params *p, const int8_t *in, int8_t *out) {
    int o, r, i;
    for (o = 0; o < p->outer; ++o)
        for (i = 0; i < p->inner; ++i) {
            int32_t sum = 0;
            for (r = 0; r < p->reduce; ++r)
                sum += (int32_t)in[((long)o * p->reduce + r) * p->inner + i] - p->input_zero_point;
            out[(long)o * p->inner + i] = finish(sum, p->multiplier, p->shift, p->output_zero_point, -128, 127);
        }
}

void eo_requantize_s8(const eo_requantize_params *p, const int8_t *in, int8_t *out) {
    int i;
    for (i = 0; i < p->size; ++i)
        out[i] = finish((int32_t)in[i] - p->input_zero_point, p->multiplier, p->shift, p->output_zero_point,
                        p->act_min, p->act_max);
}

void eo_lut_s8(const eo_lut_params *p, const int8_t *in, int8_t *out) {
    int i;
    for (i = 0; i < p->size; ++i) out[i] = p->table[(int)in[i] + 128];
}

void eo_softmax_s8(const eo_softmax_params *p, const int8_t *in, int8_t *out) {
    int r, i;
    for (r = 0; r < p->rows; ++r) {
        const int8_t *x = in + (long)r * p->depth;
        int8_t *y = out + (long)r * p->depth;
        int32_t max = -128;
        int64_t denominator = 0;
        for (i = 0; i < p->depth; ++i) if (x[i] > max) max = x[i];
        for (i = 0; i < p->depth; ++i) denominator += p->exp_table[x[i] - max + 255];
        denominator <<= 16;
        for (i = 0; i < p->depth; ++i) {
            int64_t e = p->exp_table[x[i] - max + 255];
            int64_t q = (e * p->inverse_scale + (denominator >> 1)) / denominator + p->output_zero_point;
            y[i] = (int8_t)(q > 127 ? 127 : (q < -128 ? -128 : q));
        }
    }
}

/* The input index an output index reads along an axis of n values, for a reflect (1) or edge (2) pad. */
static int eo_pad_source(int s, int n, int mode) {
    if (s < 0) return mode == 1 ? -s : 0;
    if (s >= n) return mode == 1 ? 2 * (n - 1) - s : n - 1;
    return s;
}

void eo_pad_s8(const eo_pad_params *p, const int8_t *in, int8_t *out) {
    int out_shape[4], i0, i1, i2, i3, d;
    long index = 0;
    for (d = 0; d < 4; ++d) out_shape[d] = p->in_shape[d] + p->before[d] + p->after[d];
    EO_FOR4(out_shape) {
        int s0 = i0 - p->before[0], s1 = i1 - p->before[1], s2 = i2 - p->before[2], s3 = i3 - p->before[3];
        int inside = s0 >= 0 && s0 < p->in_shape[0] && s1 >= 0 && s1 < p->in_shape[1]
                  && s2 >= 0 && s2 < p->in_shape[2] && s3 >= 0 && s3 < p->in_shape[3];
        if (!inside && p->mode != 0) {
            s0 = eo_pad_source(s0, p->in_shape[0], p->mode); s1 = eo_pad_source(s1, p->in_shape[1], p->mode);
            s2 = eo_pad_source(s2, p->in_shape[2], p->mode); s3 = eo_pad_source(s3, p->in_shape[3], p->mode);
            inside = 1;
        }
        out[index++] = inside ? in[((((long)s0 * p->in_shape[1] + s1) * p->in_shape[2] + s2) * p->in_shape[3]) + s3]
                              : p->value;
    }
}

void eo_resize_nearest_s8(const eo_resize_nearest_params *p, const int8_t *in, int8_t *out) {
    int b, oy, ox;
    for (b = 0; b < p->n; ++b)
        for (oy = 0; oy < p->out_h; ++oy)
            for (ox = 0; ox < p->out_w; ++ox)
                memcpy(out + (((long)b * p->out_h + oy) * p->out_w + ox) * p->c,
                       in + (((long)b * p->h + p->row_index[oy]) * p->w + p->col_index[ox]) * p->c, (size_t)p->c);
}

void eo_transpose_s8(const eo_transpose_params *p, const int8_t *in, int8_t *out) {
    long in_stride[EO_MAX_RANK], stride[EO_MAX_RANK], total = 1, i;
    int out_shape[EO_MAX_RANK], index[EO_MAX_RANK], d;
    for (d = p->rank - 1; d >= 0; --d) { in_stride[d] = total; total *= p->in_shape[d]; }
    for (d = 0; d < p->rank; ++d) {
        out_shape[d] = p->in_shape[p->perm[d]];
        stride[d] = in_stride[p->perm[d]];
        index[d] = 0;
    }
    for (i = 0; i < total; ++i) {
        long source = 0;
        for (d = 0; d < p->rank; ++d) source += index[d] * stride[d];
        out[i] = in[source];
        for (d = p->rank - 1; d >= 0; --d) {
            if (++index[d] < out_shape[d]) break;
            index[d] = 0;
        }
    }
}

void eo_copy_s8(const eo_copy_params *p, const int8_t *in, int8_t *out) {
    if (in != out) memmove(out, in, (size_t)p->size);
}

void eo_concat_s8(const eo_concat_params *p, const int8_t *in, int8_t *out) {
    int o;
    for (o = 0; o < p->outer; ++o)
        memcpy(out + (long)o * p->out_block + p->offset, in + (long)o * p->in_block, (size_t)p->in_block);
}

void eo_slice_s8(const eo_slice_params *p, const int8_t *in, int8_t *out) {
    int o;
    for (o = 0; o < p->outer; ++o)
        memcpy(out + (long)o * p->out_block, in + (long)o * p->in_block + p->offset, (size_t)p->out_block);
}

void eo_batch_matmul_s8(const eo_batch_matmul_params *p, const int8_t *a, const int8_t *b, int8_t *out) {
    int g, m, n, k;
    for (g = 0; g < p->batch; ++g) {
        const int8_t *left = a + (long)g * p->rows * p->depth, *right = b + (long)g * p->depth * p->columns;
        int8_t *y = out + (long)g * p->rows * p->columns;
        for (m = 0; m < p->rows; ++m)
            for (n = 0; n < p->columns; ++n) {
                int32_t acc = 0;
                for (k = 0; k < p->depth; ++k)
                    acc += ((int32_t)left[(long)m * p->depth + k] - p->a_zero_point)
                         * ((int32_t)right[(long)k * p->columns + n] - p->b_zero_point);
                y[(long)m * p->columns + n] =
                    finish(acc, p->multiplier, p->shift, p->output_zero_point, p->act_min, p->act_max);
            }
    }
}

/* The input index of tap k for uncropped output index target: (target - k * dilation) / stride when that
 * divides exactly and lands in [0, size), else -1. */
static int transposed_source(int target, int k, int stride, int dilation, int size) {
    int r = target - k * dilation;
    return (r < 0 || r % stride != 0 || r / stride >= size) ? -1 : r / stride;
}

/* The taps of one output index along one axis: first, first + step, ... below end. Exact multiples recur
 * every stride / gcd(stride, dilation) taps and the quotient falls as k grows, so the taps that land in
 * the input are one run of that progression. Found once per output position, not per channel. */
typedef struct { int first, step, end; } eo_taps;

static eo_taps transposed_taps(int target, int stride, int dilation, int kernel, int size) {
    eo_taps taps;
    int a = stride, b = dilation;
    while (b) { int r = a % b; a = b; b = r; }
    taps.step = stride / a;
    for (taps.first = 0; taps.first < kernel; ++taps.first)
        if (transposed_source(target, taps.first, stride, dilation, size) >= 0) break;
    for (taps.end = taps.first; taps.end < kernel; taps.end += taps.step)
        if (transposed_source(target, taps.end, stride, dilation, size) < 0) break;
    return taps;
}

static int32_t transposed_accumulator(const eo_conv_transpose2d_params *p, const int8_t *in, long image,
                                      int ty, int tx, const eo_taps *rows, const eo_taps *cols, int o) {
    int group_channels = p->c / p->group;
    int first = (o / (p->out_c / p->group)) * group_channels;
    int32_t zero_point = p->input_zero_point, acc = p->bias[o];
    int ky, kx, ic;
    for (ky = rows->first; ky < rows->end; ky += rows->step) {
        const int8_t *row = in + (image + (ty - ky * p->dilation_h) / p->stride_h) * p->w * p->c + first;
        const int8_t *wt = p->weight + ((long)o * p->kernel_h + ky) * p->kernel_w * group_channels;
        for (kx = cols->first; kx < cols->end; kx += cols->step) {
            const int8_t *src = row + (long)((tx - kx * p->dilation_w) / p->stride_w) * p->c;
            const int8_t *tap = wt + (long)kx * group_channels;
            for (ic = 0; ic < group_channels; ++ic)
                acc += ((int32_t)src[ic] - zero_point) * tap[ic];
        }
    }
    return acc;
}

void eo_conv_transpose2d_s8(const eo_conv_transpose2d_params *p, const int8_t *in, int8_t *out) {
    int b, oy, ox, o;
    for (b = 0; b < p->n; ++b)
        for (oy = 0; oy < p->out_h; ++oy) {
            int ty = oy + p->pad_top;
            eo_taps rows = transposed_taps(ty, p->stride_h, p->dilation_h, p->kernel_h, p->h);
            for (ox = 0; ox < p->out_w; ++ox) {
                int tx = ox + p->pad_left;
                eo_taps cols = transposed_taps(tx, p->stride_w, p->dilation_w, p->kernel_w, p->w);
                int8_t *dst = out + (((long)b * p->out_h + oy) * p->out_w + ox) * p->out_c;
                for (o = 0; o < p->out_c; ++o)
                    dst[o] = finish(transposed_accumulator(p, in, (long)b * p->h, ty, tx, &rows, &cols, o),
                                    p->multiplier[o], p->shift[o], p->output_zero_point, p->act_min, p->act_max);
            }
        }
}

/* In place: element i of in is read just before element i of out is written. */
void eo_prelu_s8(const eo_prelu_params *p, const int8_t *in, int8_t *out) {
    int o, ch, i;
    long index = 0;
    for (o = 0; o < p->outer; ++o)
        for (ch = 0; ch < p->channels; ++ch)
            for (i = 0; i < p->inner; ++i, ++index) {
                int32_t x = (int32_t)in[index] - p->input_zero_point;
                out[index] = x >= 0
                    ? finish(x, p->positive_multiplier, p->positive_shift, p->output_zero_point, p->act_min, p->act_max)
                    : finish(x * p->negative_sign[ch], p->negative_multiplier[ch], p->negative_shift[ch],
                             p->output_zero_point, p->act_min, p->act_max);
            }
}

/* total / 2^(2 * EO_BILINEAR_BITS) rounded: |total| <= 2^27, so int32 holds every step. */
static int8_t bilinear_round(int32_t total) {
    const int32_t bits = 2 * EO_BILINEAR_BITS, half = (int32_t)1 << (bits - 1);
    int32_t out;
#if EO_SINGLE_ROUNDING
    int32_t up = total + half; /* floor(up / 2^bits), spelled without shifting a negative number */
    out = up >= 0 ? up >> bits : -((-up + ((int32_t)1 << bits) - 1) >> bits);
#else
    out = total >= 0 ? (total + half) >> bits : -((half - total) >> bits);
#endif
    return (int8_t)clamp32(out, -128, 127);
}

void eo_resize_bilinear_s8(const eo_resize_bilinear_params *p, const int8_t *in, int8_t *out) {
    const int32_t one = (int32_t)1 << EO_BILINEAR_BITS;
    int b, oy, ox, ch;
    for (b = 0; b < p->n; ++b)
        for (oy = 0; oy < p->out_h; ++oy) {
            const int8_t *top = in + ((long)b * p->h + p->row_low[oy]) * p->w * p->c;
            const int8_t *bottom = in + ((long)b * p->h + p->row_high[oy]) * p->w * p->c;
            int32_t fy = p->row_fraction[oy];
            for (ox = 0; ox < p->out_w; ++ox) {
                long left = (long)p->col_low[ox] * p->c, right = (long)p->col_high[ox] * p->c;
                int32_t fx = p->col_fraction[ox];
                int8_t *dst = out + (((long)b * p->out_h + oy) * p->out_w + ox) * p->c;
                for (ch = 0; ch < p->c; ++ch) {
                    int32_t at_left = (one - fy) * top[left + ch] + fy * bottom[left + ch];
                    int32_t at_right = (one - fy) * top[right + ch] + fy * bottom[right + ch];
                    dst[ch] = bilinear_round(at_left * (one - fx) + at_right * fx);
                }
            }
        }
}

/* floor(sqrt(v)), digit by digit. */
static uint64_t isqrt64(uint64_t v) {
    uint64_t root = 0, bit = (uint64_t)1 << 62;
    while (bit > v) bit >>= 2;
    while (bit) {
        if (v >= root + bit) { v -= root + bit; root = (root >> 1) + bit; }
        else root >>= 1;
        bit >>= 2;
    }
    return root;
}

void eo_layer_norm_s8(const eo_layer_norm_params *p, const int8_t *in, int8_t *out) {
    const int32_t d_count = p->reduce;
    int o, i, c;
    for (o = 0; o < p->outer; ++o)
        for (i = 0; i < p->inner; ++i) {
            const long base = (long)o * p->reduce * p->inner + i;
            int32_t total = 0;
            int64_t squares = 0, variance, inverse = 0, half;
            int k = 0, exponent;
            for (c = 0; c < p->reduce; ++c) {
                int32_t x = in[base + (long)c * p->inner] - p->input_zero_point;
                total += x;
                squares += x * x;
            }
            if (!p->centered) total = 0;
            /* D^2 (var + eps) in input steps squared, under 2^62 */
            variance = (int64_t)d_count * squares - (int64_t)total * total + p->epsilon_term;
            if (variance > 0) {
                uint64_t shifted = (uint64_t)variance, root;
                while (shifted < ((uint64_t)1 << 60)) { shifted <<= 2; ++k; }
                root = isqrt64(shifted); /* in [2^30, 2^31): 1 / sqrt(variance) ~= 2^(k - 61) * inverse */
                inverse = (int64_t)((((uint64_t)1 << 61) + (root >> 1)) / root);
            }
            exponent = 61 - p->fraction_bits - k;
            half = (int64_t)1 << (exponent - 1);
            for (c = 0; c < p->reduce; ++c) {
                const long index = base + (long)c * p->inner;
                int64_t deviation = (int64_t)d_count * (in[index] - p->input_zero_point) - total;
                int32_t normalized = (int32_t)((deviation * inverse + half) >> exponent);
                const int a = p->affine_inner ? i : c;
                int64_t scaled = (int64_t)eo_requantize(normalized, p->multiplier[a], p->shift[a]) + p->bias[a];
                int64_t q = ((scaled + ((int64_t)1 << (p->bias_bits - 1))) >> p->bias_bits) + p->output_zero_point;
                out[index] = (int8_t)(q < p->act_min ? p->act_min : (q > p->act_max ? p->act_max : q));
            }
        }
}

/* tanh of a fixed-point input with `bits` fraction bits, in Q15: its magnitude clamped below 8, interpolated
 * between entries of the table over [0, 8] 1/32 apart by the bits below an entry, negated for a negative input. */
static int32_t rnn_tanh_fixed(const eo_recurrent_params *p, int64_t value, int bits) {
    const int shift = bits - 5;
    const int64_t limit = (int64_t)8 << bits, magnitude = value < 0 ? -value : value;
    const int32_t u = (int32_t)(magnitude > limit - 1 ? limit - 1 : magnitude);
    const int32_t low = p->tanh[u >> shift], high = p->tanh[(u >> shift) + 1];
    const int32_t result = low + (((high - low) * (u & ((1 << shift) - 1)) + (1 << (shift - 1))) >> shift);
    return value < 0 ? -result : result;
}

static int32_t rnn_tanh(const eo_recurrent_params *p, int64_t q12) { return rnn_tanh_fixed(p, q12, 12); }

/* sigmoid(x) = (1 + tanh(x / 2)) / 2 in Q15: the Q12 input read as Q13 is x / 2. */
static int32_t rnn_sigmoid(const eo_recurrent_params *p, int64_t q12) {
    return (32768 + rnn_tanh_fixed(p, q12, 13)) >> 1;
}

/* A row's exact sum times its multiplier over 2^shift, rounded half up (rnn.py's scale_rows). */
static int64_t rnn_scale_row(int32_t acc, int16_t multiplier, int shift) {
    return ((int64_t)acc * multiplier + ((int64_t)1 << (shift - 1))) >> shift;
}

/* A bias in Q12 (null: zero). */
static int64_t rnn_bias(const eo_recurrent_params *p, const int16_t *bias, int row) {
    return bias ? (int64_t)bias[row] * ((int64_t)1 << p->bias_shift) : 0;
}

/* Row `row` of W times the step's input, in Q12 with Wb. */
static int64_t rnn_input_row(const eo_recurrent_params *p, const int8_t *w, const int16_t *wb, const int8_t *x,
                             int row) {
    const int8_t *weights = w + (long)row * p->input_size;
    int32_t acc = 0;
    int i;
    for (i = 0; i < p->input_size; ++i) acc += weights[i] * (x[i] - p->input_zero_point);
    return rnn_scale_row(acc, p->w_multiplier[row], p->w_shift) + rnn_bias(p, wb, row);
}

/* Row `row` of R times a Q15 vector, in Q12 with Rb. */
static int64_t rnn_state_row(const eo_recurrent_params *p, const int8_t *r, const int16_t *rb, const int16_t *state,
                             int row) {
    const int8_t *weights = r + (long)row * p->hidden;
    int32_t acc = 0;
    int i;
    for (i = 0; i < p->hidden; ++i) acc += weights[i] * state[i];
    return rnn_scale_row(acc, p->r_multiplier[row], p->r_shift) + rnn_bias(p, rb, row);
}

/* Q15 values (an int16 state, or with `cell` an int32 one) requantized to the output at base. */
static void rnn_write(const eo_recurrent_params *p, int8_t *out, long base, const int16_t *h, const int32_t *cell) {
    int j;
    for (j = 0; j < p->hidden; ++j)
        out[base + j * p->y_stride_h] = finish(cell ? cell[j] : h[j], p->output_multiplier, p->output_shift,
                                               p->output_zero_point, p->act_min, p->act_max);
}

void eo_rnn_state_inputs(const eo_recurrent_params *p, const int8_t *state0, const int8_t *state1, long offset,
                         int16_t *h, int32_t *cell) {
    int k, j;
    for (k = 0; k < p->state_count; ++k) {
        const int8_t *state = (k == 0 ? state0 : state1) + offset;
        for (j = 0; j < p->hidden; ++j) {
            const int32_t q15 = eo_requantize(state[j] - p->state_zero_point[k], p->state_multiplier[k],
                                              p->state_shift[k]);
            if (p->state_which[k] == 0) h[j] = (int16_t)clamp32(q15, -32767, 32767);
            else if (cell) cell[j] = q15;
        }
    }
}

/* The initial h (int16) and c (int32, or none) of direction d, batch row b at offset: the constants (null:
 * zeros), or the state inputs. */
static void rnn_initial(const eo_recurrent_params *p, const int8_t *state0, const int8_t *state1, long offset,
                        int16_t *h, int32_t *cell) {
    if (p->initial) memcpy(h, p->initial + offset, sizeof(int16_t) * (size_t)p->hidden);
    else memset(h, 0, sizeof(int16_t) * (size_t)p->hidden);
    if (cell && p->initial_cell) memcpy(cell, p->initial_cell + offset, sizeof(int32_t) * (size_t)p->hidden);
    else if (cell) memset(cell, 0, sizeof(int32_t) * (size_t)p->hidden);
    if (p->state_inputs) p->state_inputs(p, state0, state1, offset, h, cell);
}

typedef struct { const int8_t *w, *r; const int16_t *wb, *rb; int backward; } rnn_direction;

static rnn_direction rnn_weights(const eo_recurrent_params *p, int d, int gates) {
    rnn_direction dir;
    const long rows = (long)gates * p->hidden;
    dir.w = p->w + d * rows * p->input_size;
    dir.r = p->r + d * rows * p->hidden;
    dir.wb = p->w_bias ? p->w_bias + d * rows : 0;
    dir.rb = p->r_bias ? p->r_bias + d * rows : 0;
    dir.backward = p->reverse || d == 1;
    return dir;
}

/* One step of a cell: the next state from x and h (GRU: `work` holds r * h and z; LSTM: `cell` is updated). */
typedef void rnn_step(const eo_recurrent_params *p, const rnn_direction *dir, const int8_t *x, const int16_t *h,
                      int16_t *next, int16_t *work, int32_t *cell);

/* Every direction and batch row of a cell of `gates` gates over the sequence: the initial state, the steps, the
 * output (with `has_cell`, an LSTM's int32 cell after the two state rows of the scratch). */
static void rnn_run(const eo_recurrent_params *p, const int8_t *in, const int8_t *state0, const int8_t *state1,
                    int8_t *out, int16_t *scratch, int gates, int has_cell, rnn_step *step_function) {
    const int H = p->hidden;
    int16_t *h = scratch, *next = scratch + H;
    int32_t *cell = has_cell ? (int32_t *)(void *)(scratch + 2 * H) : 0; /* 4-byte aligned: 2H int16 are 4H B */
    int d, b, step;
    for (d = 0; d < p->directions; ++d)
        for (b = 0; b < p->batch; ++b) {
            const rnn_direction dir = rnn_weights(p, d, gates);
            rnn_initial(p, state0, state1, ((long)d * p->batch + b) * H, h, cell);
            for (step = 0; step < p->steps; ++step) {
                const int t = dir.backward ? p->steps - 1 - step : step;
                step_function(p, &dir, in + t * p->x_stride_t + b * p->x_stride_b, h, next, scratch + 2 * H, cell);
                memcpy(h, next, sizeof(int16_t) * (size_t)H);
                if (p->output == 0) rnn_write(p, out, t * p->y_stride_t + d * p->y_stride_d + b * p->y_stride_b, h, 0);
            }
            if (p->output) rnn_write(p, out, d * p->y_stride_d + b * p->y_stride_b, h, p->output == 2 ? cell : 0);
        }
}

static void rnn_tanh_step(const eo_recurrent_params *p, const rnn_direction *dir, const int8_t *x, const int16_t *h,
                          int16_t *next, int16_t *work, int32_t *cell) {
    int j;
    (void)work;
    (void)cell;
    for (j = 0; j < p->hidden; ++j)
        next[j] = (int16_t)rnn_tanh(p, rnn_input_row(p, dir->w, dir->wb, x, j)
                                       + rnn_state_row(p, dir->r, dir->rb, h, j));
}

static void rnn_gru_step(const eo_recurrent_params *p, const rnn_direction *dir, const int8_t *x, const int16_t *h,
                         int16_t *next, int16_t *work, int32_t *cell) {
    const int H = p->hidden;
    int16_t *gated = work, *update = work + H;
    int j;
    (void)cell;
    for (j = 0; j < H; ++j) {
        const int64_t z = rnn_sigmoid(p, rnn_input_row(p, dir->w, dir->wb, x, j)
                                      + rnn_state_row(p, dir->r, dir->rb, h, j));
        const int64_t reset = rnn_sigmoid(p, rnn_input_row(p, dir->w, dir->wb, x, H + j)
                                          + rnn_state_row(p, dir->r, dir->rb, h, H + j));
        if (p->linear_before_reset) {
            const int64_t gh = rnn_state_row(p, dir->r, dir->rb, h, 2 * H + j);
            const int64_t n = rnn_tanh(p, rnn_input_row(p, dir->w, dir->wb, x, 2 * H + j)
                                          + ((reset * gh + 16384) >> 15));
            next[j] = (int16_t)(((32768 - z) * n + z * h[j] + 16384) >> 15);
        } else {
            gated[j] = (int16_t)((reset * h[j] + 16384) >> 15);
            update[j] = (int16_t)z;
        }
    }
    if (!p->linear_before_reset)
        for (j = 0; j < H; ++j) {
            const int64_t z = update[j];
            const int64_t n = rnn_tanh(p, rnn_input_row(p, dir->w, dir->wb, x, 2 * H + j)
                                          + rnn_state_row(p, dir->r, dir->rb, gated, 2 * H + j));
            next[j] = (int16_t)(((32768 - z) * n + z * h[j] + 16384) >> 15);
        }
}

static void rnn_lstm_step(const eo_recurrent_params *p, const rnn_direction *dir, const int8_t *x, const int16_t *h,
                          int16_t *next, int16_t *work, int32_t *cell) {
    const int H = p->hidden;
    int j, k;
    (void)work;
    for (j = 0; j < H; ++j) {
        int64_t gate[4], c;
        for (k = 0; k < 4; ++k) { /* i, o, f, c~ */
            const int64_t q12 = rnn_input_row(p, dir->w, dir->wb, x, k * H + j)
                                + rnn_state_row(p, dir->r, dir->rb, h, k * H + j);
            gate[k] = k < 3 ? rnn_sigmoid(p, q12) : rnn_tanh(p, q12);
        }
        c = (gate[2] * cell[j] + gate[0] * gate[3] + 16384) >> 15;
        cell[j] = sat32(c);
        next[j] = (int16_t)((gate[1] * rnn_tanh(p, (int64_t)cell[j] >> 3) + 16384) >> 15);
    }
}

void eo_rnn_s8(const eo_recurrent_params *p, const int8_t *in, const int8_t *state0, const int8_t *state1,
               int8_t *out, int16_t *scratch) {
    rnn_run(p, in, state0, state1, out, scratch, 1, 0, rnn_tanh_step);
}

void eo_gru_s8(const eo_recurrent_params *p, const int8_t *in, const int8_t *state0, const int8_t *state1,
               int8_t *out, int16_t *scratch) {
    rnn_run(p, in, state0, state1, out, scratch, 3, 0, rnn_gru_step);
}

void eo_lstm_s8(const eo_recurrent_params *p, const int8_t *in, const int8_t *state0, const int8_t *state1,
                int8_t *out, int16_t *scratch) {
    rnn_run(p, in, state0, state1, out, scratch, 4, 1, rnn_lstm_step);
}
