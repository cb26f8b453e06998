/* Building blocks of one's own models: module containers, scaled dot-product attention,
 * RMSNorm, SwiGLU, rotary embeddings, grouped-query attention, the key/value cache, the
 * transformer decoder layer and loading PyTorch's packed attention weights, each against
 * PyTorch (or a reference in plain torch ops) on the same weights. Every test runs in its own
 * scope and must leave no tensor alive behind it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qkv.h"

#include "fixtures/models_fixtures.h"
#include "harness.h"
#include "nn_harness.h"

static void assert_error_contains(const char *part) {
    const char *e = qkv_error();
    if (!e || !strstr(e, part)) fail_msg("expected an error containing \"%s\", got \"%s\"", part,
                                         e ? e : "(none)");
    qkv_clear_error();
}

/* ---- Containers -------------------------------------------------------------------------- */

static void module_list_names_its_children_by_index(void **state) {
    (void)state;
    qkv_generator g = gen(1);
    qkv_module *model = qkv_module_new("model", sizeof(qkv_module), NULL);
    qkv_module_list *blocks = qkv_module_add_module(model, "blocks",
                                                    QKV_MODULE(qkv_module_list_new()));
    for (int i = 0; i < 3; i++)
        assert_non_null(qkv_module_list_append(blocks, QKV_MODULE(qkv_linear_new(2, 2, i != 1,
                                                                                 &g))));
    assert_int_equal(blocks->n, 3);
    qkv_named_list *l = qkv_module_parameters(model);
    assert_int_equal(l->n, 5);
    assert_string_equal(l->names[0], "blocks.0.weight");
    assert_string_equal(l->names[2], "blocks.1.weight");
    assert_string_equal(l->names[4], "blocks.2.bias");
    qkv_named_list_free(l);
    assert_ptr_equal(qkv_module_list_get(blocks, -1), qkv_module_list_get(blocks, 2));
    assert_null(qkv_module_list_get(blocks, 3));
    assert_error_contains("qkv_module_list_get: index 3 out of range for a list of 3");
    qkv_tensor *y = qkv_module_forward(qkv_module_list_get(blocks, 0), qkv_ones(QKV_F32, S(1, 2)));
    assert_non_null(y);
    qkv_module_free(model);
}

static void module_dict_finds_children_by_name(void **state) {
    (void)state;
    qkv_generator g = gen(2);
    qkv_module_dict *d = qkv_module_dict_new();
    qkv_linear *enc = qkv_module_dict_set(d, "encoder", QKV_MODULE(qkv_linear_new(2, 3, true,
                                                                                  &g)));
    assert_non_null(enc);
    assert_non_null(qkv_module_dict_set(d, "head", QKV_MODULE(qkv_linear_new(3, 1, false, &g))));
    assert_ptr_equal(qkv_module_dict_get(d, "encoder"), QKV_MODULE(enc));
    assert_int_equal(qkv_module_dict_size(d), 2);
    assert_null(qkv_module_dict_get(d, "decoder"));
    assert_error_contains("no module named \"decoder\"");
    assert_null(qkv_module_dict_set(d, "head", QKV_MODULE(qkv_linear_new(1, 1, false, &g))));
    assert_error_contains("already has a member named \"head\"");
    qkv_named_list *l = qkv_module_parameters(QKV_MODULE(d));
    assert_int_equal(l->n, 3);
    assert_string_equal(l->names[2], "head.weight");
    qkv_named_list_free(l);
    qkv_module_free(QKV_MODULE(d));
}

/* ---- Scaled dot-product attention -------------------------------------------------------- */

typedef struct sdpa_case {
    const nn_fixture *q, *k, *v, *out, *w, *dq, *dk, *dv, *mask;
    qkv_dtype mask_dtype;
    bool causal;
    double scale;
} sdpa_case;

static void check_sdpa(const sdpa_case *c) {
    qkv_tensor *q = fx_leaf(c->q), *k = fx_leaf(c->k), *v = fx_leaf(c->v), *weights;
    qkv_sdpa_options o = {.attn_mask = c->mask ? fx(c->mask, c->mask_dtype) : NULL,
                          .is_causal = c->causal, .scale = c->scale, .weights = &weights};
    qkv_tensor *out = qkv_scaled_dot_product_attention(q, k, v, &o);
    assert_fixture(out, c->out, RTOL, ATOL, "out");
    assert_int_equal(weights->shape[3], 5);
    assert_true(qkv_backward(weighted(out, c->w)));
    assert_fixture(q->grad, c->dq, RTOL, ATOL, "dq");
    assert_fixture(k->grad, c->dk, RTOL, ATOL, "dk");
    assert_fixture(v->grad, c->dv, RTOL, ATOL, "dv");
}

#define SDPA_CASE(p) .q = &p##_q, .k = &p##_k, .v = &p##_v, .out = &p##_out, .w = &p##_w,       \
                     .dq = &p##_dq, .dk = &p##_dk, .dv = &p##_dv

static void sdpa_matches_torch_without_a_mask(void **state) {
    (void)state;
    check_sdpa(&(sdpa_case){SDPA_CASE(sdpa_plain)});
}

static void sdpa_bool_mask_marks_the_keys_that_take_part(void **state) {
    (void)state;
    check_sdpa(&(sdpa_case){SDPA_CASE(sdpa_bool), .mask = &sdpa_bool_mask,
                            .mask_dtype = QKV_BOOL});
}

static void sdpa_float_mask_is_added_and_scale_overrides(void **state) {
    (void)state;
    check_sdpa(&(sdpa_case){SDPA_CASE(sdpa_float), .mask = &sdpa_float_mask,
                            .mask_dtype = QKV_F32, .scale = 0.3});
}

static void sdpa_causal_is_top_left_aligned(void **state) {
    (void)state;
    check_sdpa(&(sdpa_case){SDPA_CASE(sdpa_causal), .causal = true});
}

static void sdpa_names_bad_arguments(void **state) {
    (void)state;
    qkv_tensor *q = qkv_ones(QKV_F32, S(2, 3, 4)), *k = qkv_ones(QKV_F32, S(2, 5, 4));
    qkv_tensor *v = qkv_ones(QKV_F32, S(2, 5, 6));
    qkv_sdpa_options o = {.attn_mask = qkv_ones(QKV_BOOL, S(3, 4))};
    assert_null(qkv_scaled_dot_product_attention(q, k, v, &o));
    assert_error_contains("attn_mask [3,4] does not broadcast to the scores [2,3,5]");
    o.attn_mask = qkv_ones(QKV_BOOL, S(3, 3, 5));
    assert_null(qkv_scaled_dot_product_attention(q, k, v, &o));
    assert_error_contains("does not broadcast");
    o = (qkv_sdpa_options){.attn_mask = qkv_ones(QKV_BOOL, S(3, 5)), .is_causal = true};
    assert_null(qkv_scaled_dot_product_attention(q, k, v, &o));
    assert_error_contains("attn_mask and is_causal are both set");
    assert_null(qkv_scaled_dot_product_attention(q, v, v, NULL));
    assert_error_contains("expected [..., L, E], [..., S, E], [..., S, Ev]");
    o = (qkv_sdpa_options){.dropout_p = 0.5, .training = true};
    assert_null(qkv_scaled_dot_product_attention(q, k, v, &o));
    assert_error_contains("needs a generator");
    /* dropout acts in training only */
    o.training = false;
    assert_non_null(qkv_scaled_dot_product_attention(q, k, v, &o));
}

/* ---- RMSNorm, SwiGLU, RoPE --------------------------------------------------------------- */

static void rms_norm_matches_reference(void **state) {
    (void)state;
    qkv_rms_norm *m = qkv_rms_norm_new(8, 1e-6);
    assert_param_names(m, rms_norm_params);
    load_params(m, rms_norm_params);
    qkv_tensor *x = fx_leaf(&rms_norm_x);
    qkv_tensor *out = qkv_rms_norm_forward(m, x);
    assert_fixture(out, &rms_norm_out, RTOL, ATOL, "out");
    assert_true(qkv_backward(weighted(out, &rms_norm_w)));
    assert_fixture(x->grad, &rms_norm_dx, RTOL, ATOL, "dx");
    assert_grads(m, rms_norm_grads);
    assert_null(qkv_rms_norm_forward(m, qkv_ones(QKV_F32, S(2, 7))));
    assert_error_contains("qkv_rms_norm_forward: x [2,7]; expected [..., 8]");
    qkv_module_free(QKV_MODULE(m));
}

static void rms_norm_default_eps_is_the_dtype_epsilon(void **state) {
    (void)state;
    qkv_rms_norm *m = qkv_rms_norm_new(2, 0);
    /* mean(x^2) = 0: the output is x / sqrt(eps) */
    qkv_tensor *out = qkv_module_forward(QKV_MODULE(m), qkv_zeros(QKV_F64, S(1, 2)));
    assert_values(out, 2, (double[]){0, 0}, 0);
    out = qkv_module_forward(QKV_MODULE(m), qkv_full(QKV_F64, S(1, 2), 1e-9));
    double want = 1e-9 / sqrt(1e-18 + 2.220446049250313e-16);
    assert_values(out, 2, (double[]){want, want}, 1e-12 * want);
    qkv_module_free(QKV_MODULE(m));
}

/* The weight is the first input, read in place by the module; x the second. */
static qkv_tensor *rms_norm_call(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    return qkv_rms_norm_forward(ctx, in[1]);
}

/* In F64 the module runs the fused op; its gradients against central differences, for rows
 * shorter and longer than the kernel's eight lanes. */
static void rms_norm_passes_gradcheck(void **state) {
    (void)state;
    qkv_generator g = gen(9);
    for (int64_t d = 3; d <= 19; d += 16) {
        qkv_rms_norm *m = qkv_rms_norm_new(d, 1e-5);
        assert_true(qkv_module_to_dtype(QKV_MODULE(m), QKV_F64));
        assert_true(qkv_copy_(m->weight, qkv_randn(QKV_F64, S(d), &g)));
        qkv_tensor *in[2] = {m->weight, qkv_requires_grad_(qkv_randn(QKV_F64, S(2, 3, d), &g),
                                                           true)};
        if (!qkv_gradcheck(rms_norm_call, in, 2, m, 1e-6, 1e-7, 1e-5)) fail_msg("%s", qkv_error());
        qkv_module_free(QKV_MODULE(m));
    }
}

static void swiglu_matches_torch(void **state) {
    (void)state;
    qkv_generator g = gen(3);
    qkv_swiglu *m = qkv_swiglu_new(6, 10, &g);
    assert_param_names(m, swiglu_params);
    load_params(m, swiglu_params);
    qkv_tensor *x = fx_leaf(&swiglu_x);
    qkv_tensor *out = qkv_swiglu_forward(m, x);
    assert_fixture(out, &swiglu_out, RTOL, ATOL, "out");
    assert_true(qkv_backward(weighted(out, &swiglu_w)));
    assert_fixture(x->grad, &swiglu_dx, RTOL, ATOL, "dx");
    assert_grads(m, swiglu_grads);
    qkv_module_free(QKV_MODULE(m));
}

/* got and want hold the same values, bit for bit (NaN nowhere). */
static void assert_same_values(const qkv_tensor *got, const qkv_tensor *want, const char *what) {
    assert_non_null(got);
    assert_non_null(want);
    assert_int_equal(got->numel, want->numel);
    qkv_tensor *g = qkv_contiguous(qkv_to_dtype(got, QKV_F64));
    qkv_tensor *w = qkv_contiguous(qkv_to_dtype(want, QKV_F64));
    const double *gd = qkv_data(g), *wd = qkv_data(w);
    for (int64_t i = 0; i < got->numel; i++)
        if (!(gd[i] == wd[i])) fail_msg("%s: element %lld is %.17g, want %.17g", what,
                                        (long long)i, gd[i], wd[i]);
}

/* Under autocast the block's products run in bf16, and its gate qkv_silu_mul gives the bits
 * of the composition qkv_mul(qkv_silu(w1 x), w3 x): the output, the input's gradient and
 * every weight's. */
static void swiglu_under_autocast_is_the_composition(void **state) {
    (void)state;
    qkv_generator g = gen(4);
    qkv_swiglu *m = qkv_swiglu_new(16, 40, &g);
    qkv_tensor *x = qkv_requires_grad_(qkv_randn(QKV_F32, S(2, 3, 16), &g), true);
    qkv_tensor *w = qkv_randn(QKV_F32, S(2, 3, 16), &g);
    qkv_tensor *weights[3] = {m->w1->weight, m->w2->weight, m->w3->weight};
    qkv_tensor *out[2], *grads[2][4];
    for (int k = 0; k < 2; k++) {
        assert_true(qkv_autocast_begin(QKV_BF16));
        out[k] = k == 0 ? qkv_swiglu_forward(m, x)
                        : qkv_linear_forward(m->w2, qkv_mul(qkv_silu(qkv_linear_forward(m->w1, x)),
                                                            qkv_linear_forward(m->w3, x)));
        qkv_autocast_end();
        assert_int_equal(out[k]->dtype, QKV_BF16);
        assert_true(qkv_backward(qkv_sum_all(qkv_mul(out[k], w))));
        grads[k][0] = qkv_detach(x->grad);
        qkv_zero_grad(x);
        for (int i = 0; i < 3; i++) {
            grads[k][i + 1] = qkv_detach(weights[i]->grad);
            qkv_zero_grad(weights[i]);
        }
    }
    assert_same_values(out[0], out[1], "output");
    static const char *const names[] = {"dx", "dw1", "dw2", "dw3"};
    for (int i = 0; i < 4; i++) assert_same_values(grads[0][i], grads[1][i], names[i]);
    qkv_module_free(QKV_MODULE(m));
}

static void rope_matches_the_llama_layout_at_an_offset(void **state) {
    (void)state;
    qkv_rotary_embedding *m = qkv_rotary_embedding_new(8, 16, 0);
    qkv_tensor *x = fx_leaf(&rope_x);
    qkv_tensor *out = qkv_rotary_embedding_forward(m, x, 3);
    assert_fixture(out, &rope_out, RTOL, ATOL, "out");
    assert_true(qkv_backward(weighted(out, &rope_w)));
    assert_fixture(x->grad, &rope_dx, RTOL, ATOL, "dx");
    qkv_named_list *l = qkv_module_state(QKV_MODULE(m));
    assert_int_equal(l->n, 0); /* nothing of it is saved */
    qkv_named_list_free(l);
    qkv_module_free(QKV_MODULE(m));
}

/* The tables are the second and third inputs, constants for the check. */
static qkv_tensor *rotary_call(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    (void)ctx;
    return qkv_rotary(in[0], in[1], in[2]);
}

/* The op's gradient against central differences in F64, on a transposed x (read through a
 * copy), on heads split off a projection (read in place) and with F32 tables converted to x's
 * dtype. */
static void rotary_passes_gradcheck(void **state) {
    (void)state;
    qkv_generator g = gen(12);
    qkv_tensor *x = qkv_requires_grad_(qkv_randn(QKV_F64, S(2, 5, 6), &g), true);
    qkv_tensor *in[3] = {x, qkv_randn(QKV_F64, S(5, 6), &g), qkv_randn(QKV_F32, S(5, 6), &g)};
    if (!qkv_gradcheck(rotary_call, in, 3, NULL, 1e-6, 1e-7, 1e-5)) fail_msg("%s", qkv_error());
    in[0] = qkv_requires_grad_(qkv_transpose(qkv_randn(QKV_F64, S(2, 4, 3), &g), -2, -1), true);
    in[1] = qkv_randn(QKV_F64, S(3, 4), &g);
    in[2] = qkv_randn(QKV_F64, S(3, 4), &g);
    if (!qkv_gradcheck(rotary_call, in, 3, NULL, 1e-6, 1e-7, 1e-5)) fail_msg("%s", qkv_error());
    in[0] = qkv_requires_grad_(qkv_transpose(qkv_randn(QKV_F64, S(2, 3, 2, 4), &g), 1, 2), true);
    if (!qkv_gradcheck(rotary_call, in, 3, NULL, 1e-6, 1e-7, 1e-5)) fail_msg("%s", qkv_error());
}

/* Heads split off a projection, [B,T,H,d] viewed as [B,H,T,d], are read in place and give
 * the values of their contiguous copy, bit for bit. */
static void rotary_of_split_heads_is_that_of_their_copy(void **state) {
    (void)state;
    qkv_generator g = gen(13);
    qkv_tensor *heads = qkv_transpose(qkv_randn(QKV_F32, S(2, 7, 3, 8), &g), 1, 2);
    qkv_tensor *c = qkv_randn(QKV_F32, S(7, 8), &g), *s = qkv_randn(QKV_F32, S(7, 8), &g);
    qkv_tensor *got = qkv_rotary(heads, c, s), *want = qkv_rotary(qkv_contiguous(heads), c, s);
    assert_non_null(got);
    assert_memory_equal(qkv_data(got), qkv_data(want), (size_t)got->numel * sizeof(float));
}

static void rotary_refuses_tables_that_do_not_fit(void **state) {
    (void)state;
    qkv_tensor *x = qkv_ones(QKV_F32, S(2, 3, 4)), *t = qkv_ones(QKV_F32, S(3, 4));
    assert_null(qkv_rotary(x, qkv_ones(QKV_F32, S(2, 4)), t));
    assert_error_contains("qkv_rotary: x f32 [2,3,4], cos [2,4], sin [3,4]; expected a float "
                          "x [..., T, d] with d even and float tables [T, d]");
    qkv_clear_error();
    assert_null(qkv_rotary(qkv_ones(QKV_F32, S(3, 3)), qkv_ones(QKV_F32, S(3, 3)),
                           qkv_ones(QKV_F32, S(3, 3))));
    assert_error_contains("with d even");
    qkv_clear_error();
    assert_null(qkv_rotary(x, qkv_requires_grad_(qkv_ones(QKV_F32, S(3, 4)), true), t));
    assert_error_contains("qkv_rotary: cos and sin are tables; they cannot require grad");
    qkv_clear_error();
    assert_null(qkv_rotary(x, NULL, t));
    assert_non_null(qkv_error());
}

static void rope_names_positions_past_its_table(void **state) {
    (void)state;
    qkv_rotary_embedding *m = qkv_rotary_embedding_new(4, 6, 10000);
    qkv_tensor *x = qkv_ones(QKV_F32, S(1, 4, 4));
    assert_non_null(qkv_rotary_embedding_forward(m, x, 2));
    assert_null(qkv_rotary_embedding_forward(m, x, 3));
    assert_error_contains("positions 3..6 are past the table's 6 (max_len)");
    assert_null(qkv_rotary_embedding_forward(m, qkv_ones(QKV_F32, S(4, 6)), 0));
    assert_error_contains("expected a float [..., T, 4]");
    assert_null(qkv_rotary_embedding_new(5, 6, 0));
    assert_error_contains("dim 5 must be positive and even");
    qkv_module_free(QKV_MODULE(m));
}

/* ---- Grouped-query attention ------------------------------------------------------------- */

static void grouped_query_attention_with_rope_matches_reference(void **state) {
    (void)state;
    qkv_generator g = gen(4);
    qkv_multi_head_attention *m = qkv_grouped_query_attention_new(8, 4, 2, 0.0, true, &g);
    assert_int_equal(m->k_proj->weight->shape[0], 4);
    assert_param_names(m, gqa_params);
    load_params(m, gqa_params);
    qkv_rotary_embedding *rope = qkv_rotary_embedding_new(2, 16, 0);
    qkv_tensor *x = fx_leaf(&gqa_x);
    qkv_attention_options o = {.is_causal = true, .rope = rope};
    qkv_tensor *out = qkv_multi_head_attention_forward(m, x, x, x, &o);
    assert_fixture(out, &gqa_out, RTOL, ATOL, "out");
    assert_true(qkv_backward(weighted(out, &gqa_w)));
    assert_fixture(x->grad, &gqa_dx, RTOL, ATOL, "dx");
    assert_grads(m, gqa_grads);
    qkv_module_free(QKV_MODULE(rope));
    qkv_module_free(QKV_MODULE(m));
}

static void grouped_query_attention_needs_kv_heads_dividing_heads(void **state) {
    (void)state;
    qkv_generator g = gen(5);
    assert_null(qkv_grouped_query_attention_new(12, 6, 4, 0.0, false, &g));
    assert_error_contains("qkv_grouped_query_attention_new: num_kv_heads 4 must divide "
                          "num_heads 6");
    assert_null(qkv_grouped_query_attention_new(12, 6, 0, 0.0, false, &g));
    assert_error_contains("num_kv_heads 0 must divide");
}

/* ---- Decoder layer ----------------------------------------------------------------------- */

typedef struct decoder_case {
    bool norm_first;
    const nn_fixture *tgt, *memory, *tgt_padding, *memory_padding, *out, *w, *dtgt, *dmemory;
    const nn_named_fixture *params, *grads;
} decoder_case;

static void check_decoder(const decoder_case *c) {
    qkv_generator g = gen(6);
    qkv_transformer_decoder_layer *m = qkv_transformer_decoder_layer_new(
        &(qkv_transformer_config){.d_model = 8, .nhead = 2, .dim_feedforward = 16,
                                  .activation = QKV_ACT_GELU, .norm_first = c->norm_first},
        &g);
    assert_param_names(m, c->params);
    load_params(m, c->params);
    qkv_tensor *tgt = fx_leaf(c->tgt), *memory = fx_leaf(c->memory);
    qkv_decoder_options o = {.tgt_is_causal = true,
                             .tgt_key_padding_mask = fx(c->tgt_padding, QKV_BOOL),
                             .memory_key_padding_mask = fx(c->memory_padding, QKV_BOOL)};
    qkv_tensor *out = qkv_transformer_decoder_layer_forward(m, tgt, memory, &o);
    assert_fixture(out, c->out, RTOL, ATOL, "out");
    assert_true(qkv_backward(weighted(out, c->w)));
    assert_fixture(tgt->grad, c->dtgt, RTOL, ATOL, "dtgt");
    assert_fixture(memory->grad, c->dmemory, RTOL, ATOL, "dmemory");
    assert_grads(m, c->grads);
    o.memory_mask = qkv_zeros(QKV_BOOL, S(4, 4));
    assert_null(qkv_transformer_decoder_layer_forward(m, tgt, memory, &o));
    assert_error_contains("attn_mask [4,4]; expected [4,5]");
    qkv_module_free(QKV_MODULE(m));
}

#define DECODER_CASE(p) .tgt = &p##_tgt, .memory = &p##_memory, .tgt_padding = &p##_tgt_padding, \
    .memory_padding = &p##_memory_padding, .out = &p##_out, .w = &p##_w, .dtgt = &p##_dtgt,      \
    .dmemory = &p##_dmemory, .params = p##_params, .grads = p##_grads

static void decoder_layer_post_norm_matches_torch(void **state) {
    (void)state;
    check_decoder(&(decoder_case){.norm_first = false, DECODER_CASE(decoder_post)});
}

static void decoder_layer_pre_norm_matches_torch(void **state) {
    (void)state;
    check_decoder(&(decoder_case){.norm_first = true, DECODER_CASE(decoder_pre)});
}

/* ---- A decoder-only model, whole and with a key/value cache -------------------------------- */

/* A LLaMA-style block: x + attn(norm(x)), then h + ffn(norm(h)), with RoPE and GQA. */
typedef struct block {
    qkv_module base;
    qkv_rms_norm *attention_norm, *ffn_norm;
    qkv_multi_head_attention *attention;
    qkv_swiglu *feed_forward;
} block;

static block *block_new(qkv_generator *g) {
    block *b = qkv_module_new("block", sizeof *b, NULL);
    b->attention_norm = qkv_module_add_module(&b->base, "attention_norm",
                                              QKV_MODULE(qkv_rms_norm_new(8, 1e-5)));
    b->attention = qkv_module_add_module(&b->base, "attention", QKV_MODULE(
        qkv_grouped_query_attention_new(8, 4, 2, 0.0, false, g)));
    b->ffn_norm = qkv_module_add_module(&b->base, "ffn_norm",
                                        QKV_MODULE(qkv_rms_norm_new(8, 1e-5)));
    b->feed_forward = qkv_module_add_module(&b->base, "feed_forward",
                                            QKV_MODULE(qkv_swiglu_new(8, 12, g)));
    return b;
}

static qkv_tensor *block_body(block *b, const qkv_tensor *x, qkv_kv_cache *cache,
                              qkv_rotary_embedding *rope) {
    qkv_attention_options o = {.is_causal = true, .cache = cache, .rope = rope};
    qkv_tensor *n = qkv_rms_norm_forward(b->attention_norm, x);
    qkv_tensor *h = qkv_add(x, qkv_multi_head_attention_forward(b->attention, n, n, n, &o));
    return qkv_add(h, qkv_swiglu_forward(b->feed_forward, qkv_rms_norm_forward(b->ffn_norm, h)));
}

static qkv_tensor *block_forward(block *b, const qkv_tensor *x, qkv_kv_cache *cache,
                                 qkv_rotary_embedding *rope) {
    return QKV_CALL(b, block_body(b, x, cache, rope));
}

typedef struct tiny_lm {
    qkv_module base;
    qkv_embedding *tok_embeddings;
    qkv_module_list *layers;
    qkv_rms_norm *norm;
    qkv_linear *output;
    qkv_rotary_embedding *rope;
} tiny_lm;

static void tiny_lm_destroy(qkv_module *m) {
    qkv_module_free(QKV_MODULE(((tiny_lm *)m)->rope));
}

static tiny_lm *tiny_lm_new(qkv_generator *g) {
    tiny_lm *m = qkv_module_new("tiny_lm", sizeof *m, tiny_lm_destroy);
    m->tok_embeddings = qkv_module_add_module(&m->base, "tok_embeddings",
                                              QKV_MODULE(qkv_embedding_new(20, 8, -1, g)));
    m->layers = qkv_module_add_module(&m->base, "layers", QKV_MODULE(qkv_module_list_new()));
    for (int i = 0; i < 2; i++)
        assert_non_null(qkv_module_list_append(m->layers, QKV_MODULE(block_new(g))));
    m->norm = qkv_module_add_module(&m->base, "norm", QKV_MODULE(qkv_rms_norm_new(8, 1e-5)));
    m->output = qkv_module_add_module(&m->base, "output",
                                      QKV_MODULE(qkv_linear_new(8, 20, false, g)));
    m->rope = qkv_rotary_embedding_new(2, 32, 0);
    assert_non_null(m->output);
    assert_non_null(m->rope);
    return m;
}

/* Logits [B,T,20]; caches NULL for the whole sequence, else one per layer. */
static qkv_tensor *tiny_lm_body(tiny_lm *m, const qkv_tensor *ids, qkv_kv_cache **caches) {
    qkv_tensor *x = qkv_embedding_forward(m->tok_embeddings, ids);
    for (int i = 0; i < m->layers->n; i++)
        x = block_forward((block *)qkv_module_list_get(m->layers, i), x,
                          caches ? caches[i] : NULL, m->rope);
    return qkv_linear_forward(m->output, qkv_rms_norm_forward(m->norm, x));
}

static qkv_tensor *tiny_lm_forward(tiny_lm *m, const qkv_tensor *ids, qkv_kv_cache **caches) {
    return QKV_CALL(m, tiny_lm_body(m, ids, caches));
}

static void decoder_only_model_has_llama_names(void **state) {
    (void)state;
    qkv_generator g = gen(7);
    tiny_lm *m = tiny_lm_new(&g);
    qkv_named_list *l = qkv_module_parameters(QKV_MODULE(m));
    assert_string_equal(l->names[0], "tok_embeddings.weight");
    assert_string_equal(l->names[1], "layers.0.attention_norm.weight");
    assert_string_equal(l->names[2], "layers.0.attention.q_proj.weight");
    assert_string_equal(l->names[7], "layers.0.feed_forward.w1.weight");
    assert_string_equal(l->names[l->n - 1], "output.weight");
    qkv_named_list_free(l);
    qkv_module_free(QKV_MODULE(m));
}

/* Feeding a prompt of 3 tokens and then one token at a time through the caches gives, at each
 * position, the logits of the whole sequence run at once under the causal mask. */
static void kv_cache_decoding_equals_the_full_sequence(void **state) {
    (void)state;
    qkv_generator g = gen(8);
    tiny_lm *m = tiny_lm_new(&g);
    qkv_module_train(QKV_MODULE(m), false);
    int64_t ids[2][7] = {{1, 7, 3, 19, 0, 4, 4}, {5, 5, 2, 11, 8, 13, 6}};
    qkv_tensor *all = qkv_from_array(QKV_I64, S(2, 7), ids);
    qkv_no_grad_begin();
    qkv_tensor *full = tiny_lm_forward(m, all, NULL);
    assert_non_null(full);
    qkv_kv_cache *caches[2] = {qkv_kv_cache_new(7), qkv_kv_cache_new(7)};
    int64_t start = 0;
    for (int64_t len = 3; start < 7; start += len, len = 1) {
        qkv_tensor *step = tiny_lm_forward(m, qkv_narrow(all, 1, start, len), caches);
        assert_non_null(step);
        assert_int_equal(qkv_kv_cache_length(caches[0]), start + len);
        qkv_tensor *want = qkv_contiguous(qkv_narrow(full, 1, start, len));
        double w[2 * 3 * 20], got[2 * 3 * 20];
        assert_true(qkv_copy_out(want, QKV_F64, w));
        assert_true(qkv_copy_out(step, QKV_F64, got));
        for (int64_t i = 0; i < want->numel; i++)
            if (!(fabs(got[i] - w[i]) <= 1e-5 * (1 + fabs(w[i]))))
                fail_msg("position %lld, element %lld: %.9g, expected %.9g", (long long)start,
                         (long long)i, got[i], w[i]);
    }
    /* the caches are full: one more token is an error, and changes nothing */
    assert_null(tiny_lm_forward(m, qkv_narrow(all, 1, 0, 1), caches));
    assert_error_contains("the kv cache holds 7 of 7 positions; 1 more do not fit");
    assert_int_equal(qkv_kv_cache_length(caches[0]), 7);
    qkv_kv_cache_reset(caches[0]);
    qkv_kv_cache_reset(caches[1]);
    assert_non_null(tiny_lm_forward(m, qkv_narrow(all, 1, 0, 1), caches));
    /* another batch size is an error too */
    assert_null(tiny_lm_forward(m, qkv_narrow(qkv_narrow(all, 0, 0, 1), 1, 1, 1), caches));
    assert_error_contains("the kv cache holds f32 [2,2,1,2], the new keys are f32 [1,2,1,2]");
    qkv_no_grad_end();
    qkv_kv_cache_free(caches[0]);
    qkv_kv_cache_free(caches[1]);
    qkv_module_free(QKV_MODULE(m));
}

/* A prompt longer than the rotary table is refused by name. */
static void prompt_longer_than_the_context_is_an_error(void **state) {
    (void)state;
    qkv_generator g = gen(9);
    tiny_lm *m = tiny_lm_new(&g);
    qkv_tensor *ids = qkv_zeros(QKV_I64, S(1, 33));
    assert_null(tiny_lm_forward(m, ids, NULL));
    assert_error_contains("positions 0..32 are past the table's 32 (max_len)");
    assert_null(qkv_kv_cache_new(0));
    assert_error_contains("qkv_kv_cache_new: max_len 0 < 1");
    qkv_module_free(QKV_MODULE(m));
}

/* ---- Loading PyTorch's packed attention weights ------------------------------------------ */

static const char *in_proj_path(void) {
    return QKV_FIXTURES "/data/mha_in_proj.safetensors";
}

static qkv_module_dict *two_attentions(qkv_generator *g) {
    qkv_module_dict *d = qkv_module_dict_new();
    assert_non_null(qkv_module_dict_set(d, "attn", QKV_MODULE(
        qkv_multi_head_attention_new(8, 2, 0.0, true, 0, 0, g))));
    assert_non_null(qkv_module_dict_set(d, "cross", QKV_MODULE(
        qkv_multi_head_attention_new(8, 2, 0.0, true, 5, 6, g))));
    return d;
}

static void load_splits_torch_in_proj_into_q_k_v(void **state) {
    (void)state;
    qkv_generator g = gen(10);
    qkv_module_dict *d = two_attentions(&g);
    qkv_load_report report;
    qkv_load_options o = {.split_in_proj = true, .report = &report};
    if (!qkv_module_load(QKV_MODULE(d), in_proj_path(), &o)) fail_msg("%s", qkv_error());
    assert_int_equal(report.n_missing, 0);
    assert_int_equal(report.n_unexpected, 0);
    qkv_load_report_free(&report);
    qkv_tensor *q = fx(&in_proj_query, QKV_F32);
    qkv_tensor *out = qkv_multi_head_attention_forward(
        (qkv_multi_head_attention *)qkv_module_dict_get(d, "attn"), q, q, q, NULL);
    assert_fixture(out, &in_proj_out_self, RTOL, ATOL, "self");
    out = qkv_multi_head_attention_forward(
        (qkv_multi_head_attention *)qkv_module_dict_get(d, "cross"), q,
        fx(&in_proj_key, QKV_F32), fx(&in_proj_value, QKV_F32), NULL);
    assert_fixture(out, &in_proj_out_cross, RTOL, ATOL, "cross");
    qkv_module_free(QKV_MODULE(d));
}

static void strict_load_names_every_missing_and_unexpected_tensor(void **state) {
    (void)state;
    qkv_generator g = gen(11);
    qkv_module_dict *d = two_attentions(&g);
    qkv_tensor *before = qkv_clone(((qkv_multi_head_attention *)qkv_module_dict_get(d, "attn"))
                                       ->out_proj->weight);
    assert_false(qkv_module_load(QKV_MODULE(d), in_proj_path(), NULL));
    const char *e = qkv_error();
    assert_non_null(e);
    assert_non_null(strstr(e, "12 missing from the file (\"attn.q_proj.weight\", "
                              "\"attn.q_proj.bias\", \"attn.k_proj.weight\""));
    assert_non_null(strstr(e, "\"cross.v_proj.bias\"); 6 unexpected in the file "
                              "(\"attn.in_proj_weight\", \"attn.in_proj_bias\", "
                              "\"cross.q_proj_weight\""));
    qkv_clear_error();
    /* nothing was loaded */
    qkv_tensor *after = ((qkv_multi_head_attention *)qkv_module_dict_get(d, "attn"))
                            ->out_proj->weight;
    assert_true(qkv_get(qkv_sum_all(qkv_eq(before, after)), NULL) == (double)after->numel);
    qkv_load_report report;
    qkv_load_options o = {.partial = true, .report = &report};
    assert_true(qkv_module_load(QKV_MODULE(d), in_proj_path(), &o));
    assert_int_equal(report.n_missing, 12);
    assert_int_equal(report.n_unexpected, 6);
    assert_string_equal(report.missing[11], "cross.v_proj.bias");
    int n = 0;
    for (int i = 0; in_proj_torch_keys[i]; i++)
        if (strstr(in_proj_torch_keys[i], "_proj_")) {
            assert_true(n < report.n_unexpected);
            assert_string_equal(report.unexpected[n++], in_proj_torch_keys[i]);
        }
    assert_int_equal(n, 6);
    qkv_load_report_free(&report);
    assert_int_equal(report.n_missing, 0);
    qkv_module_free(QKV_MODULE(d));
}

static void split_in_proj_checks_the_packed_shape(void **state) {
    (void)state;
    qkv_generator g = gen(12);
    qkv_module_dict *d = qkv_module_dict_new();
    assert_non_null(qkv_module_dict_set(d, "attn", QKV_MODULE(
        qkv_multi_head_attention_new(4, 2, 0.0, true, 0, 0, &g))));
    assert_non_null(qkv_module_dict_set(d, "cross", QKV_MODULE(
        qkv_multi_head_attention_new(8, 2, 0.0, true, 5, 6, &g))));
    qkv_load_options o = {.split_in_proj = true};
    assert_false(qkv_module_load(QKV_MODULE(d), in_proj_path(), &o));
    assert_error_contains("\"attn.in_proj_weight\" is [24,8] in the file but [12,4] in the "
                          "model (3 packed)");
    qkv_module_free(QKV_MODULE(d));
}

/* A training step through empty caches, leaving the caches and gradients empty: nothing is
 * held between the sweep's runs. */
static bool cached_step(tiny_lm *m, const qkv_tensor *ids, qkv_kv_cache **caches) {
    bool ok = qkv_backward(qkv_sum_all(tiny_lm_forward(m, ids, caches)));
    qkv_module_zero_grad(QKV_MODULE(m));
    qkv_kv_cache_reset(caches[0]);
    qkv_kv_cache_reset(caches[1]);
    return ok;
}

static void models_survive_every_allocation_failure(void **state) {
    (void)state;
    qkv_generator g = gen(13);
    tiny_lm *m = tiny_lm_new(&g);
    qkv_tensor *ids = qkv_from_array(QKV_I64, S(1, 4), (int64_t[]){3, 1, 4, 1});
    qkv_kv_cache *caches[2] = {qkv_kv_cache_new(8), qkv_kv_cache_new(8)};
    assert_every_allocation_failure_is_clean_in_a_scope(cached_step(m, ids, caches));
    qkv_kv_cache_free(caches[0]);
    qkv_kv_cache_free(caches[1]);
    qkv_module_dict *d = two_attentions(&g);
    qkv_load_report report;
    qkv_load_options o = {.split_in_proj = true, .partial = true, .report = &report};
    assert_every_allocation_failure_is_clean(
        (qkv_module_load(QKV_MODULE(d), in_proj_path(), &o) ? (qkv_load_report_free(&report),
                                                               true)
                                                            : (qkv_load_report_free(&report),
                                                               false)));
    qkv_module_free(QKV_MODULE(d));
    qkv_module_free(QKV_MODULE(m));
}

int main(void) {
#define T(name) cmocka_unit_test_setup_teardown(name, open_scope, close_scope)
    const struct CMUnitTest tests[] = {
        T(module_list_names_its_children_by_index),
        T(module_dict_finds_children_by_name),
        T(sdpa_matches_torch_without_a_mask),
        T(sdpa_bool_mask_marks_the_keys_that_take_part),
        T(sdpa_float_mask_is_added_and_scale_overrides),
        T(sdpa_causal_is_top_left_aligned),
        T(sdpa_names_bad_arguments),
        T(rms_norm_matches_reference),
        T(rms_norm_default_eps_is_the_dtype_epsilon),
        T(rotary_passes_gradcheck),
        T(rotary_of_split_heads_is_that_of_their_copy),
        T(rotary_refuses_tables_that_do_not_fit),
        T(rms_norm_passes_gradcheck),
        T(swiglu_matches_torch),
        T(swiglu_under_autocast_is_the_composition),
        T(rope_matches_the_llama_layout_at_an_offset),
        T(rope_names_positions_past_its_table),
        T(grouped_query_attention_with_rope_matches_reference),
        T(grouped_query_attention_needs_kv_heads_dividing_heads),
        T(decoder_layer_post_norm_matches_torch),
        T(decoder_layer_pre_norm_matches_torch),
        T(decoder_only_model_has_llama_names),
        T(kv_cache_decoding_equals_the_full_sequence),
        T(prompt_longer_than_the_context_is_an_error),
        T(load_splits_torch_in_proj_into_q_k_v),
        T(strict_load_names_every_missing_and_unexpected_tensor),
        T(split_in_proj_checks_the_packed_shape),
        T(models_survive_every_allocation_failure),
    };
    return cmocka_run_group_tests_name("models", tests, NULL, NULL);
}
