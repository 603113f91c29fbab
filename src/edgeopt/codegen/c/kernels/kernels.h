/* edgeopt int8 kernels: portable C99, no malloc, no float.
 * Tensors are int8, NHWC for rank 4. Every kernel is the C version of the
 * function of the same name in edgeopt/runtime/reference/ops.py, and must
 * match it bit for bit. Requantization rounding is chosen at compile time:
 * EO_SINGLE_ROUNDING=1 (CMSIS-NN single rounding) or 0 (TFLite double rounding). */
#ifndef EO_KERNELS_H
#define EO_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#ifndef EO_SINGLE_ROUNDING
#define EO_SINGLE_ROUNDING 0
#endif

int32_t eo_requantize(int32_t x, int32_t multiplier, int32_t shift);

/* Conv (NHWC, weight OHWI). zero_point_sums[o] = input_zero_point * (sum of o's weights), for the windows
 * inside the input (eo_conv2d_s8, eo_conv2d_add_s8; eo_conv_transpose2d_s8 does not read it). */
typedef struct {
    int n, h, w, c, out_h, out_w, out_c, kernel_h, kernel_w, group;
    int stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left;
    int32_t input_zero_point, output_zero_point, act_min, act_max;
    const int8_t *weight; const int32_t *bias, *multiplier, *zero_point_sums; const int8_t *shift;
} eo_conv2d_params;
void eo_conv2d_s8(const eo_conv2d_params *p, const int8_t *in, int8_t *out);
/* A depthwise conv (group = c = out_c > 1), its weight HWC (kernel_h, kernel_w, channels), not OHWI. */
void eo_depthwise_conv2d_s8(const eo_conv2d_params *p, const int8_t *in, int8_t *out);

/* bias: the int32 bias with -input_zero_point * (sum of o's weights) folded in. */
typedef struct {
    int rows, depth, out_features;
    int32_t input_zero_point, output_zero_point, act_min, act_max;
    const int8_t *weight; const int32_t *bias, *multiplier; const int8_t *shift;
} eo_fully_connected_params;
void eo_fully_connected_s8(const eo_fully_connected_params *p, const int8_t *in, int8_t *out);

/* Broadcasting binary ops over 4-D shapes (rank padded on the left); stride 0 broadcasts. */
typedef struct {
    int shape[4]; int a_stride[4]; int b_stride[4];
    int32_t a_zero_point, b_zero_point, a_multiplier, b_multiplier, a_shift, b_shift;
    int32_t output_multiplier, output_shift, output_zero_point, left_shift, act_min, act_max;
} eo_add_params;
void eo_add_s8(const eo_add_params *p, const int8_t *a, const int8_t *b, int8_t *out);

/* out = add(conv(in), shortcut) element by element, the conv's int8 result rounded and clamped first;
 * add's shape and strides are unused (no broadcasting). out may be shortcut (in place), never in. */
typedef struct { eo_conv2d_params conv; eo_add_params add; } eo_conv2d_add_params;
void eo_conv2d_add_s8(const eo_conv2d_add_params *p, const int8_t *in, const int8_t *shortcut, int8_t *out);

typedef struct {
    int shape[4]; int a_stride[4]; int b_stride[4];
    int32_t a_zero_point, b_zero_point, output_multiplier, output_shift, output_zero_point, act_min, act_max;
} eo_mul_params;
void eo_mul_s8(const eo_mul_params *p, const int8_t *a, const int8_t *b, int8_t *out);

typedef struct {
    int n, h, w, c, out_h, out_w, kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left;
    int32_t act_min, act_max;
} eo_max_pool_params;
void eo_max_pool_s8(const eo_max_pool_params *p, const int8_t *in, int8_t *out);

typedef struct {
    int n, h, w, c, out_h, out_w, kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left;
    int pad_bottom, pad_right, count_include_pad;
    int32_t input_zero_point, output_zero_point, act_min, act_max;
    const int32_t *multiplier; const int8_t *shift; /* indexed by window count */
} eo_avg_pool_params;
void eo_avg_pool_s8(const eo_avg_pool_params *p, const int8_t *in, int8_t *out);

typedef struct {
    int outer, reduce, inner;
    int32_t input_zero_point, output_zero_point, multiplier, shift;
} eo_mean_params;
void eo_mean_s8(const eo_mean_params *p, const int8_t *in, int8_t *out);

typedef struct {
    int size;
    int32_t input_zero_point, output_zero_point, multiplier, shift, act_min, act_max;
} eo_requantize_params;
void eo_requantize_s8(const eo_requantize_params *p, const int8_t *in, int8_t *out);

typedef struct { int size; const int8_t *table; } eo_lut_params;
void eo_lut_s8(const eo_lut_params *p, const int8_t *in, int8_t *out);

typedef struct {
    int rows, depth; const int32_t *exp_table; int64_t inverse_scale; int32_t output_zero_point;
} eo_softmax_params;
void eo_softmax_s8(const eo_softmax_params *p, const int8_t *in, int8_t *out);

/* mode: 0 fills with value, 1 reflects about the edge (not repeating it), 2 repeats the edge. */
typedef struct { int in_shape[4]; int before[4]; int after[4]; int8_t value; int mode; } eo_pad_params;
void eo_pad_s8(const eo_pad_params *p, const int8_t *in, int8_t *out);

typedef struct {
    int n, h, w, c, out_h, out_w; const int32_t *row_index, *col_index;
} eo_resize_nearest_params;
void eo_resize_nearest_s8(const eo_resize_nearest_params *p, const int8_t *in, int8_t *out);

#define EO_MAX_RANK 6
typedef struct { int rank; int in_shape[EO_MAX_RANK]; int perm[EO_MAX_RANK]; } eo_transpose_params;
void eo_transpose_s8(const eo_transpose_params *p, const int8_t *in, int8_t *out);

typedef struct { int size; } eo_copy_params;
void eo_copy_s8(const eo_copy_params *p, const int8_t *in, int8_t *out);

/* Copies one concat input: outer blocks of in_block bytes into out blocks of out_block bytes at offset. */
typedef struct { int outer, in_block, out_block, offset; } eo_concat_params;
void eo_concat_s8(const eo_concat_params *p, const int8_t *in, int8_t *out);

/* Slice/Split: outer blocks of out_block bytes from in blocks of in_block bytes at offset (concat's inverse). */
typedef struct { int outer, in_block, out_block, offset; } eo_slice_params;
void eo_slice_s8(const eo_slice_params *p, const int8_t *in, int8_t *out);

/* MatMul of two activations, both in row-major order: y[g] = requant((a[g] - za) x (b[g] - zb)) per batch g. */
typedef struct {
    int batch, rows, depth, columns;
    int32_t a_zero_point, b_zero_point, output_zero_point, multiplier, shift, act_min, act_max;
} eo_batch_matmul_params;
void eo_batch_matmul_s8(const eo_batch_matmul_params *p, const int8_t *a, const int8_t *b, int8_t *out);

/* Transposed conv (ONNX ConvTranspose) in gather form, a conv's fields and OHWI weight (I = c / group):
 * out[b, oy, ox, o] = requant(bias[o] + sum of (in[b, iy, ix, i] - zp) * weight[o, ky, kx, i] over the taps
 * with iy * stride_h + ky * dilation_h = oy + pad_top (and the same for x) inside the input; pad_top and
 * pad_left are where the output starts in the uncropped transposed output. out is never in. */
typedef eo_conv2d_params eo_conv_transpose2d_params;
void eo_conv_transpose2d_s8(const eo_conv_transpose2d_params *p, const int8_t *in, int8_t *out);

/* PRelu with a slope along one axis: the tensor viewed as outer x channels x inner, the slope's axis in the
 * middle; x >= zero point requantized by positive_*, below by the channel's negative_* after its sign. */
typedef struct {
    int outer, channels, inner;
    int32_t input_zero_point, output_zero_point, positive_multiplier, positive_shift, act_min, act_max;
    const int32_t *negative_multiplier; const int8_t *negative_shift, *negative_sign;
} eo_prelu_params;
void eo_prelu_s8(const eo_prelu_params *p, const int8_t *in, int8_t *out);

/* Bilinear resize, NHWC: rows row_low/row_high weighted (2^EO_BILINEAR_BITS - f, f) with f = row_fraction,
 * columns alike; the Q20 sum rounded once (half away from zero, or half up with EO_SINGLE_ROUNDING). */
#define EO_BILINEAR_BITS 10
typedef struct {
    int n, h, w, c, out_h, out_w;
    const int32_t *row_low, *row_high, *row_fraction, *col_low, *col_high, *col_fraction;
} eo_resize_bilinear_params;
void eo_resize_bilinear_s8(const eo_resize_bilinear_params *p, const int8_t *in, int8_t *out);

/* LayerNorm of each (outer, inner) row of D = reduce values (stride inner), in integers: see LayerNormParams in
 * edgeopt/runtime/reference/program.py. multiplier/shift/bias are per position of a row (gamma and beta folded
 * with the output scale, bias_bits below its step), or per inner position with affine_inner (InstanceNorm's
 * per-channel scale); centered 0: no mean subtracted, values taken less input_zero_point (RMSNorm, L2 norm);
 * out may be in (in place). */
typedef struct {
    int outer, reduce, inner, affine_inner, centered;
    int32_t input_zero_point;
    int64_t epsilon_term;
    int32_t fraction_bits, bias_bits, output_zero_point, act_min, act_max;
    const int32_t *multiplier, *bias; const int8_t *shift;
} eo_layer_norm_params;
void eo_layer_norm_s8(const eo_layer_norm_params *p, const int8_t *in, int8_t *out);

/* ONNX RNN, GRU and LSTM (edgeopt/runtime/reference/rnn.py): int8 sequence in, one output out (output 0: Y,
 * 1: Y_h, 2: an LSTM's Y_c). The state is Q15 in scratch (2 or 4 x hidden int16, in the arena; an LSTM's cell
 * int32 Q15);
 * gate inputs are Q12 (each row's sum times its int16 multiplier over a power of two per matrix), read from a
 * 257-entry Q15 tanh table over [0, 8] (odd). x at t * x_stride_t + b * x_stride_b + i;
 * out at t * y_stride_t + d * y_stride_d + b * y_stride_b + j * y_stride_h (t = 0 for Y_h and Y_c). Direction 1,
 * or the only one when reverse, runs from the last step. G gates: RNN 1; GRU z, r, n; LSTM i, o, f, c. */
typedef struct eo_recurrent_params eo_recurrent_params;
/* The initial h (int16) and c (int32, or none) moved to Q15 from int8 state inputs (a streaming model's) at offset:
 * eo_rnn_state_inputs, by pointer, so that a model without state inputs links none of it. */
typedef void eo_rnn_states_fn(const eo_recurrent_params *p, const int8_t *state0, const int8_t *state1, long offset,
                              int16_t *h, int32_t *cell);
struct eo_recurrent_params {
    int output, steps, batch, input_size, hidden, directions, reverse, linear_before_reset;
    long x_stride_t, x_stride_b, y_stride_t, y_stride_d, y_stride_b, y_stride_h;
    int32_t input_zero_point, output_multiplier, output_shift, output_zero_point, act_min, act_max;
    const int8_t *w, *r;                                        /* [D][G*H][I], [D][G*H][H] */
    const int16_t *w_multiplier, *r_multiplier;                 /* [G*H]: to Q12 over 2^w_shift, 2^r_shift */
    int w_shift, r_shift;
    const int16_t *w_bias, *r_bias;                 /* [D][G*H], Q12 over 2^-bias_shift; null: zeros */
    int bias_shift;
    const int16_t *initial;                                     /* [D][B][H] Q15; null: zeros */
    const int32_t *initial_cell;                                /* [D][B][H] Q15 (LSTM); null: zeros */
    const int16_t *tanh;      /* 257 entries over [0, 8]; sigmoid(x) = (1 + tanh(x / 2)) / 2 */
    /* initial states read from int8 tensors state0, state1 ([D][B][H], a streaming model's) instead: for each,
     * 0 for h or 1 for c, its zero point and the multiplier and shift of its scale to Q15 */
    eo_rnn_states_fn *state_inputs; /* eo_rnn_state_inputs, or null without state inputs */
    int state_count, state_which[2];
    int32_t state_zero_point[2], state_multiplier[2], state_shift[2];
};
void eo_rnn_state_inputs(const eo_recurrent_params *p, const int8_t *state0, const int8_t *state1, long offset,
                         int16_t *h, int32_t *cell);
void eo_rnn_s8(const eo_recurrent_params *p, const int8_t *in, const int8_t *state0, const int8_t *state1,
               int8_t *out, int16_t *scratch);
void eo_gru_s8(const eo_recurrent_params *p, const int8_t *in, const int8_t *state0, const int8_t *state1,
               int8_t *out, int16_t *scratch);
void eo_lstm_s8(const eo_recurrent_params *p, const int8_t *in, const int8_t *state0, const int8_t *state1,
                int8_t *out, int16_t *scratch);

#ifdef __cplusplus
}
#endif

#endif
