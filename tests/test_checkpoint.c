/* Checkpoints: safetensors save and load of modules with extras, the strict and partial load
 * rules, hostile files refused with a message, interrupted and killed saves that leave the
 * previous file whole, allocation failures, and a classifier saved by PyTorch that gives
 * PyTorch's logits in qkv. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "qkv.h"
#include "examples/classify/model.h"
#include "harness.h"

static char dir[64];
static char path[128];

/* A scope (open_scope) and a directory of the test's own. */
static int setup(void **state) {
    snprintf(dir, sizeof dir, "/tmp/qkv-ckpt-XXXXXX");
    if (!mkdtemp(dir)) return -1;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    return open_scope(state);
}

/* Removes the directory; fails the test if any file other than model.safetensors was left
 * behind (a temporary file of an interrupted save), or anything it made outlives its scope. */
static int teardown(void **state) {
    qkv_debug_fail_write_after(0);
    qkv_debug_fail_alloc_at(0);
    int strays = 0;
    DIR *d = opendir(dir);
    for (struct dirent *e; d && (e = readdir(d));) {
        if (e->d_name[0] == '.') continue;
        char p[400];
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        strays += strcmp(e->d_name, "model.safetensors") != 0;
        unlink(p);
    }
    if (d) closedir(d);
    rmdir(dir);
    close_scope(state);
    return strays == 0 ? 0 : -1;
}

static void write_bytes(const char *p, const void *data, size_t n) {
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
}

/* A file of the 8-byte length, the header text as given, then n_data bytes of data. */
static void write_raw(const char *header, size_t n_data, const void *data) {
    size_t hn = strlen(header);
    unsigned char *buf = calloc(1, 8 + hn + n_data + 1);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((uint64_t)hn >> (8 * i));
    memcpy(buf + 8, header, hn);
    if (data) memcpy(buf + 8 + hn, data, n_data);
    write_bytes(path, buf, 8 + hn + n_data);
    free(buf);
}

static void assert_error_contains(const char *what) {
    const char *e = qkv_error();
    if (!e || !strstr(e, what)) fail_msg("expected an error containing \"%s\", got \"%s\"", what,
                                         e ? e : "(none)");
    qkv_clear_error();
}

static void assert_same_values(const qkv_tensor *a, const qkv_tensor *b) {
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(a->dtype, b->dtype);
    assert_int_equal(a->numel, b->numel);
    size_t n = (size_t)a->numel * qkv_dtype_size(a->dtype);
    char *x = malloc(n + 1), *y = malloc(n + 1);
    assert_true(qkv_copy_out(a, a->dtype, x));
    assert_true(qkv_copy_out(b, b->dtype, y));
    assert_memory_equal(x, y, n);
    free(x);
    free(y);
}

static qkv_transformer_encoder_layer *encoder_layer(uint64_t seed) {
    qkv_generator g;
    qkv_generator_init(&g, seed);
    qkv_transformer_config c = {.d_model = 8, .nhead = 2, .dim_feedforward = 16,
                                .activation = QKV_ACT_GELU, .norm_first = true};
    qkv_transformer_encoder_layer *m = qkv_transformer_encoder_layer_new(&c, &g);
    assert_non_null(m);
    return m;
}

/* Every parameter and buffer of a and b holds the same bytes. */
static void assert_same_state(const void *a, const void *b) {
    qkv_named_list *x = qkv_module_state(a), *y = qkv_module_state(b);
    assert_int_equal(x->n, y->n);
    for (int i = 0; i < x->n; i++) {
        assert_string_equal(x->names[i], y->names[i]);
        assert_same_values(x->tensors[i], y->tensors[i]);
    }
    qkv_named_list_free(x);
    qkv_named_list_free(y);
}

/* ---- Round trips ------------------------------------------------------------------------- */

static void save_then_load_restores_every_parameter(void **state) {
    (void)state;
    qkv_transformer_encoder_layer *a = encoder_layer(1), *b = encoder_layer(2);
    assert_true(qkv_module_save(QKV_MODULE(a), path, NULL));
    assert_true(qkv_module_load(QKV_MODULE(b), path, NULL));
    assert_same_state(a, b);
    qkv_module_free(QKV_MODULE(a));
    qkv_module_free(QKV_MODULE(b));
}

static void extras_round_trip_tensors_bytes_and_metadata(void **state) {
    (void)state;
    qkv_linear *m = qkv_linear_new(3, 2, true, &(qkv_generator){0});
    qkv_generator g;
    qkv_generator_init(&g, 3);
    qkv_tensor *moments = qkv_randn(QKV_F64, QKV_SHAPE(2, 3), &g);
    qkv_tensor *step = qkv_scalar(QKV_I64, 12345678901LL);
    qkv_tensor *mask = qkv_gt_scalar(qkv_randn(QKV_F32, QKV_SHAPE(5), &g), 0);
    /* a transposed view is saved by value, in row-major order */
    qkv_tensor *view =
        qkv_transpose(qkv_reshape(qkv_arange(QKV_F32, 0, 6, 1), QKV_SHAPE(2, 3)), 0, 1);
    const char *names[] = {"optim.m", "optim.step", "mask", "view"};
    qkv_tensor *tensors[] = {moments, step, mask, view};
    qkv_named_bytes bytes[] = {{"vocab", "a\0b\xff", 4}, {"empty", NULL, 0}};
    qkv_meta_pair meta[] = {{"format", "test 1"}, {"quote", "say \"hi\"\n\t\\ ünïcode"}};
    qkv_checkpoint_contents x = {4, names, tensors, 2, bytes, 2, meta};
    assert_true(qkv_module_save(QKV_MODULE(m), path, &x));

    qkv_safetensors *f = qkv_safetensors_read(path);
    assert_non_null(f);
    assert_int_equal(qkv_safetensors_count(f), 8);
    assert_string_equal(qkv_safetensors_name(f, 0), "weight");
    assert_string_equal(qkv_safetensors_name(f, 7), "empty");
    assert_same_values(qkv_safetensors_tensor(f, "optim.m"), moments);
    assert_same_values(qkv_safetensors_tensor(f, "optim.step"), step);
    assert_same_values(qkv_safetensors_tensor(f, "mask"), mask);
    qkv_tensor *v = qkv_safetensors_tensor(f, "view");
    assert_same_values(v, qkv_contiguous(view));
    assert_int_equal(v->shape[0], 3);
    assert_true(qkv_get(v, (int64_t[]){0, 1}) == 3.0);
    size_t n = 99;
    const char *vb = qkv_safetensors_bytes(f, "vocab", &n);
    assert_int_equal(n, 4);
    assert_memory_equal(vb, "a\0b\xff", 4);
    assert_non_null(qkv_safetensors_bytes(f, "empty", &n));
    assert_int_equal(n, 0);
    assert_string_equal(qkv_safetensors_meta(f, "format"), "test 1");
    assert_string_equal(qkv_safetensors_meta(f, "quote"), "say \"hi\"\n\t\\ ünïcode");
    assert_null(qkv_safetensors_meta(f, "absent"));
    assert_null(qkv_error()); /* an absent key is not an error */
    assert_null(qkv_safetensors_tensor(f, "absent"));
    assert_error_contains("no tensor named \"absent\"");
    assert_null(qkv_safetensors_bytes(f, "weight", &n));
    assert_error_contains("no 1-D U8 tensor named \"weight\"");
    /* the extras are declared, so a strict load accepts the file */
    assert_true(qkv_module_load_safetensors(QKV_MODULE(m), f, NULL));
    qkv_safetensors_free(f);
    qkv_module_free(QKV_MODULE(m));
}

static void saved_file_is_plain_safetensors(void **state) {
    (void)state;
    qkv_linear *m = qkv_linear_new(2, 1, false, &(qkv_generator){0});
    qkv_fill_(m->weight, 0.5);
    assert_true(qkv_module_save(QKV_MODULE(m), path, NULL));
    FILE *fp = fopen(path, "rb");
    unsigned char buf[256];
    size_t n = fread(buf, 1, sizeof buf, fp);
    fclose(fp);
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++) hlen |= (uint64_t)buf[i] << (8 * i);
    assert_int_equal((8 + hlen) % 8, 0); /* data aligned to 8 bytes */
    assert_int_equal(n, 8 + hlen + 8);
    const char *want = "{\"weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8]},"
                       "\"__metadata__\":{\"qkv.checksum\":\"crc32:";
    assert_memory_equal(buf + 8, want, strlen(want));
    float w[2];
    memcpy(w, buf + 8 + hlen, 8);
    assert_true(w[0] == 0.5f && w[1] == 0.5f);
    qkv_module_free(QKV_MODULE(m));
}

static void load_converts_between_float_dtypes(void **state) {
    (void)state;
    qkv_linear *a = qkv_linear_new(3, 2, true, &(qkv_generator){0});
    qkv_linear *b = qkv_linear_new(3, 2, true, &(qkv_generator){0});
    assert_true(qkv_module_to_dtype(QKV_MODULE(a), QKV_F64));
    qkv_fill_(a->weight, 0.1);
    assert_true(qkv_module_save(QKV_MODULE(a), path, NULL));
    assert_true(qkv_module_load(QKV_MODULE(b), path, NULL));
    assert_int_equal(b->weight->dtype, QKV_F32);
    assert_true(qkv_get(b->weight, (int64_t[]){1, 2}) == (double)0.1f);
    qkv_module_free(QKV_MODULE(a));
    qkv_module_free(QKV_MODULE(b));
}

/* ---- Strict and partial loads ------------------------------------------------------------ */

static void load_shape_mismatch_names_it_and_changes_nothing(void **state) {
    (void)state;
    qkv_linear *a = qkv_linear_new(3, 2, true, &(qkv_generator){0});
    qkv_linear *b = qkv_linear_new(4, 2, true, &(qkv_generator){0});
    qkv_linear *before = qkv_linear_new(4, 2, true, &(qkv_generator){0});
    assert_true(qkv_module_save(QKV_MODULE(a), path, NULL));
    assert_false(qkv_module_load(QKV_MODULE(b), path, NULL));
    char want[256];
    snprintf(want, sizeof want, "qkv_module_load: %s: \"weight\" is [2,3] in the file but "
             "[2,4] in the model", path);
    assert_string_equal(qkv_error(), want);
    qkv_clear_error();
    /* bias matched, but nothing is copied when any entry is wrong */
    assert_same_state(b, before);
    qkv_module_free(QKV_MODULE(a));
    qkv_module_free(QKV_MODULE(b));
    qkv_module_free(QKV_MODULE(before));
}

static void load_dtype_mismatch_is_an_error(void **state) {
    (void)state;
    const char *names[] = {"weight"};
    qkv_tensor *tensors[] = {qkv_zeros(QKV_I64, QKV_SHAPE(1, 2))};
    qkv_named_list list = {1, (char **)names, tensors};
    assert_true(qkv_safetensors_write(path, &list, NULL));
    qkv_linear *m = qkv_linear_new(2, 1, false, &(qkv_generator){0});
    assert_false(qkv_module_load(QKV_MODULE(m), path, NULL));
    assert_error_contains("\"weight\" is i64 in the file but f32 in the model");
    qkv_module_free(QKV_MODULE(m));
}

static void missing_and_unexpected_names_fail_unless_partial(void **state) {
    (void)state;
    qkv_linear *with_bias = qkv_linear_new(3, 2, true, &(qkv_generator){0});
    qkv_linear *no_bias = qkv_linear_new(3, 2, false, &(qkv_generator){0});
    qkv_fill_(with_bias->weight, 2.0);
    assert_true(qkv_module_save(QKV_MODULE(no_bias), path, NULL));
    assert_false(qkv_module_load(QKV_MODULE(with_bias), path, NULL));
    assert_error_contains("1 missing from the file (\"bias\")");
    assert_true(qkv_get(with_bias->weight, (int64_t[]){0, 0}) == 2.0);
    qkv_load_options partial = {.partial = true};
    assert_true(qkv_module_load(QKV_MODULE(with_bias), path, &partial));
    assert_same_values(with_bias->weight, no_bias->weight);

    assert_true(qkv_module_save(QKV_MODULE(with_bias), path, NULL));
    assert_false(qkv_module_load(QKV_MODULE(no_bias), path, NULL));
    assert_error_contains("1 unexpected in the file (\"bias\")");
    assert_true(qkv_module_load(QKV_MODULE(no_bias), path, &partial));
    qkv_module_free(QKV_MODULE(with_bias));
    qkv_module_free(QKV_MODULE(no_bias));
}

static void save_refuses_bad_and_duplicate_names(void **state) {
    (void)state;
    qkv_linear *m = qkv_linear_new(3, 2, true, &(qkv_generator){0});
    const char *names[] = {"bias"};
    qkv_tensor *tensors[] = {qkv_zeros(QKV_F32, QKV_SHAPE(1))};
    qkv_checkpoint_contents dup = {.n_tensors = 1, .tensor_names = names, .tensors = tensors};
    assert_false(qkv_module_save(QKV_MODULE(m), path, &dup));
    assert_error_contains("two tensors named \"bias\"");
    const char *bad[] = {"line\nbreak"};
    qkv_checkpoint_contents ctl = {.n_tensors = 1, .tensor_names = bad, .tensors = tensors};
    assert_false(qkv_module_save(QKV_MODULE(m), path, &ctl));
    assert_error_contains("bad tensor name");
    qkv_meta_pair reserved[] = {{"qkv.checksum", "crc32:00000000"}};
    qkv_checkpoint_contents meta = {.n_meta = 1, .meta = reserved};
    assert_false(qkv_module_save(QKV_MODULE(m), path, &meta));
    assert_error_contains("bad metadata key \"qkv.checksum\"");
    qkv_meta_pair format[] = {{"qkv.format", "1"}};
    qkv_checkpoint_contents meta2 = {.n_meta = 1, .meta = format};
    assert_false(qkv_module_save(QKV_MODULE(m), path, &meta2));
    assert_error_contains("bad metadata key \"qkv.format\"");
    assert_int_equal(access(path, F_OK), -1); /* nothing was written */
    qkv_module_free(QKV_MODULE(m));
}

/* ---- Resuming training ------------------------------------------------------------------- */

static const classifier_config small = {.vocab_size = 20, .n_classes = 3, .max_len = 6,
                                        .dim = 8, .heads = 2, .layers = 1, .ffn = 16,
                                        .dropout = 0.2};

static qkv_optimizer *adam_for(classifier *m) {
    qkv_named_list *params = qkv_module_parameters(QKV_MODULE(m));
    qkv_optimizer *opt = qkv_adam_new();
    assert_true(qkv_optimizer_add_group(opt, params, qkv_adam_config(0.01)));
    qkv_named_list_free(params);
    return opt;
}

/* One Adam step on batch `step` of a fixed sequence; returns the loss. */
static float train_step(classifier *m, qkv_optimizer *opt, int step) {
    qkv_generator g;
    qkv_generator_init(&g, 100 + (uint64_t)step);
    qkv_scope_begin();
    qkv_tensor *ids = qkv_randint(1, 20, QKV_SHAPE(4, 6), &g);
    qkv_tensor *pad = qkv_gt_scalar(qkv_arange(QKV_I64, 0, 6, 1), 3 + step % 3);
    pad = qkv_contiguous(qkv_expand(pad, QKV_SHAPE(4, 6)));
    qkv_tensor *labels = qkv_randint(0, 3, QKV_SHAPE(4), &g);
    qkv_tensor *loss = qkv_cross_entropy(classifier_forward(m, ids, pad), labels,
                                         QKV_REDUCTION_MEAN, -100, 0);
    assert_non_null(loss);
    float value = (float)qkv_item(loss);
    qkv_optimizer_zero_grad(opt);
    assert_true(qkv_backward(loss));
    assert_true(qkv_optimizer_step(opt));
    qkv_scope_end();
    return value;
}

/* With dropout on: the masks after the load continue the sequence they would have drawn. */
static void training_resumed_from_a_checkpoint_is_bitwise_identical(void **state) {
    (void)state;
    enum { N = 5 };
    qkv_generator g;
    qkv_generator_init(&g, 5);
    classifier *straight = classifier_new(&small, &g);
    qkv_optimizer *opt = adam_for(straight);
    float losses[2 * N];
    for (int s = 0; s < 2 * N; s++) losses[s] = train_step(straight, opt, s);
    qkv_optimizer_free(opt);

    qkv_generator_init(&g, 5);
    classifier *first = classifier_new(&small, &g);
    opt = adam_for(first);
    for (int s = 0; s < N; s++) assert_true(train_step(first, opt, s) == losses[s]);
    qkv_meta_pair meta[] = {{"epoch", "3"}};
    qkv_checkpoint_contents x = {.n_meta = 1, .meta = meta};
    assert_true(qkv_checkpoint_save(QKV_MODULE(first), opt, path, &x));
    qkv_optimizer_free(opt);
    qkv_module_free(QKV_MODULE(first));

    qkv_generator_init(&g, 99); /* other initial weights: the checkpoint replaces them */
    classifier *second = classifier_new(&small, &g);
    opt = adam_for(second);
    assert_true(qkv_checkpoint_load(QKV_MODULE(second), opt, path, NULL));
    assert_int_equal(qkv_optimizer_steps(opt), N);
    /* the dropout generators were saved where they stood, and are restored there */
    qkv_generator_list *gens = qkv_module_generators(QKV_MODULE(second));
    assert_int_equal(gens->n, 5); /* embedding dropout, attention, three in the layer */
    assert_string_equal(gens->items[0].name, "dropout.generator");
    assert_string_equal(gens->items[1].name, "encoder.layers.0.self_attn.generator");
    qkv_generator_list_free(gens);
    for (int s = N; s < 2 * N; s++) assert_true(train_step(second, opt, s) == losses[s]);
    assert_same_state(second, straight);
    qkv_optimizer_free(opt);

    /* an optimizer that does not fit the saved state is refused by name */
    qkv_optimizer *sgd = qkv_sgd_new();
    qkv_named_list *params = qkv_module_parameters(QKV_MODULE(second));
    assert_true(qkv_optimizer_add_group(sgd, params, qkv_sgd_config(0.1)));
    qkv_named_list_free(params);
    assert_false(qkv_checkpoint_load(QKV_MODULE(second), sgd, path, NULL));
    assert_non_null(qkv_error());
    qkv_clear_error();
    qkv_optimizer_free(sgd);
    qkv_module_free(QKV_MODULE(second));
    qkv_module_free(QKV_MODULE(straight));
}

static void empty_tensors_at_a_shared_offset_round_trip(void **state) {
    (void)state;
    /* "z" (empty) and "a" both start at byte 0; the order of the header must not matter */
    const char *names[] = {"z", "a", "e"};
    qkv_tensor *tensors[] = {qkv_zeros(QKV_F32, QKV_SHAPE(0)), qkv_ones(QKV_F32, QKV_SHAPE(2)),
                             qkv_zeros(QKV_F64, QKV_SHAPE(3, 0))};
    qkv_named_list list = {3, (char **)names, tensors};
    assert_true(qkv_safetensors_write(path, &list, NULL));
    qkv_safetensors *f = qkv_safetensors_read(path);
    assert_non_null(f);
    assert_int_equal(qkv_safetensors_tensor(f, "z")->numel, 0);
    assert_int_equal(qkv_safetensors_tensor(f, "e")->shape[0], 3);
    assert_same_values(qkv_safetensors_tensor(f, "a"), tensors[1]);
    qkv_safetensors_free(f);
}

static void save_refuses_repeated_metadata_and_reserved_names(void **state) {
    (void)state;
    qkv_linear *m = qkv_linear_new(2, 1, true, &(qkv_generator){0});
    qkv_meta_pair twice[] = {{"k", "1"}, {"k", "2"}};
    qkv_checkpoint_contents x = {.n_meta = 2, .meta = twice};
    assert_false(qkv_module_save(QKV_MODULE(m), path, &x));
    assert_error_contains("bad metadata key \"k\"");
    qkv_meta_pair steps[] = {{"optim.steps", "7"}};
    qkv_checkpoint_contents y = {.n_meta = 1, .meta = steps};
    assert_false(qkv_checkpoint_save(QKV_MODULE(m), NULL, path, &y));
    assert_error_contains("\"optim.steps\": names starting with optim. or rng. are the "
                          "checkpoint's own");
    const char *names[] = {"rng.mine"};
    qkv_tensor *tensors[] = {qkv_zeros(QKV_I64, QKV_SHAPE(2))};
    qkv_checkpoint_contents z = {.n_tensors = 1, .tensor_names = names, .tensors = tensors};
    assert_false(qkv_checkpoint_save(QKV_MODULE(m), NULL, path, &z));
    assert_error_contains("\"rng.mine\"");
    assert_int_equal(access(path, F_OK), -1);
    qkv_module_free(QKV_MODULE(m));
}

static void a_save_keeps_the_mode_of_the_file_it_replaces(void **state) {
    (void)state;
    qkv_linear *m = qkv_linear_new(2, 1, true, &(qkv_generator){0});
    assert_true(qkv_module_save(QKV_MODULE(m), path, NULL));
    assert_int_equal(chmod(path, 0600), 0);
    assert_true(qkv_module_save(QKV_MODULE(m), path, NULL));
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    qkv_module_free(QKV_MODULE(m));
}

static void a_module_only_file_given_an_optimizer_changes_nothing(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 5);
    classifier *a = classifier_new(&small, &g), *b = classifier_new(&small, &g);
    assert_true(qkv_module_save(QKV_MODULE(a), path, NULL));
    qkv_optimizer *opt = adam_for(b);
    train_step(b, opt, 0);
    qkv_named_list *state_b = qkv_module_state(QKV_MODULE(b));
    qkv_tensor *copies[64];
    assert_true(state_b->n <= 64);
    for (int i = 0; i < state_b->n; i++) copies[i] = qkv_clone(state_b->tensors[i]);

    assert_false(qkv_checkpoint_load(QKV_MODULE(b), opt, path, NULL));
    char want[256];
    snprintf(want, sizeof want, "qkv_checkpoint_load: %s: ", path);
    assert_memory_equal(qkv_error(), want, strlen(want));
    qkv_clear_error();
    for (int i = 0; i < state_b->n; i++) assert_same_values(state_b->tensors[i], copies[i]);
    assert_int_equal(qkv_optimizer_steps(opt), 1);
    qkv_named_list_free(state_b);
    qkv_optimizer_free(opt);
    qkv_module_free(QKV_MODULE(a));
    qkv_module_free(QKV_MODULE(b));
}

/* ---- Hostile files ----------------------------------------------------------------------- */

typedef struct hostile {
    const char *header;
    size_t n_data;
    const char *message;
} hostile;

static void hostile_headers_are_refused_with_a_message(void **state) {
    (void)state;
    static const unsigned char data[64] = {0, 1, 2};
    static const hostile cases[] = {
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4,
         "data_offsets run past the end of the file"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12,
         "overlaps another tensor"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8,
         "a gap in the data before tensor \"a\""},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8,
         "bytes after the last tensor's data"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8,
         "data_offsets disagree with its dtype and shape"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 8,
         "data_offsets disagree"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],"
         "\"data_offsets\":[0,0]}}", 0, "its shape's size overflows"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[99999999999999999999],"
         "\"data_offsets\":[0,0]}}", 0, "number too large"},
        {"{\"a\":{\"dtype\":\"Q4\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "unknown dtype"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
         "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8,
         "two tensors named \"a\""},
        {"{\"a\":{\"dtype\":{\"dtype\":{\"dtype\":[[[[[[[[[[1]]]]]]]]]]}}}}", 0,
         "header byte 14: expected '\"'"},
        {"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", 0,
         "header byte 0: expected '{'"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_off", 4, "unterminated string"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", 4,
         "expected '}'"},
        {"{\"\xc3\x28\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
         "string is not UTF-8"},
        {"{\"\xed\xa0\x80\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
         "string is not UTF-8"},
        {"{\"a\\u0000b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
         "bad escape in a string"},
        {"{\"a\\ud800\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
         "bad escape in a string"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}",
         4, "more than 8 dimensions"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4,
         "expected a non-negative integer"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4,
         "expected an integer"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}", 4,
         "unknown field in a tensor entry"},
        {"{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
         4, "repeated field in a tensor entry"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 0,
         "a tensor entry needs dtype, shape and data_offsets"},
        {"{\"__metadata__\":{\"k\":1}}", 0, "__metadata__ values must be strings"},
        {"{\"__metadata__\":{\"k\":\"a\",\"k\":\"b\"}}", 0, "duplicate key \"k\" in __metadata__"},
        {"{\"__metadata__\":{},\"__metadata__\":{}}", 0, "two __metadata__ objects"},
        {"{\"__metadata__\":{\"qkv.checksum\":\"crc32:0000000\"}}", 0,
         "malformed qkv.checksum"},
        {"{\"__metadata__\":{\"qkv.checksum\":\"crc32:00000001\"}}", 0,
         "checksum mismatch: the file is damaged"},
        {"{} x", 0, "data after the header's JSON object"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[18446744073709551620],"
         "\"data_offsets\":[0,4]}}", 4, "number too large"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[0,4611686018427387903,4611686018427387903],"
         "\"data_offsets\":[0,0]}}", 0, "its shape's size overflows"},
        {"{\"__metadata__\":{\"qkv.checksum\":\"crc32:0x000000\"}}", 0,
         "malformed qkv.checksum"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}\x01}", 4,
         "expected '}'"},
        {"{\"__metadata__\":{\"qkv.format\":\"2\"}}", 0,
         "qkv.format without qkv.checksum: the file is damaged"},
        {"{\"__metadata__\":{\"qkv.checksum\":\"crc32:00000000\",\"qkv.format\":\"3\"}}", 0,
         "unsupported qkv.format \"3\""},
        {"{\"__metadata__\":{\"qkv.checksum\":\"crc32:0000000\\u0030\"}}", 0,
         "malformed qkv.checksum"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_raw(cases[i].header, cases[i].n_data, data);
        qkv_safetensors *f = qkv_safetensors_read(path);
        if (f) fail_msg("case %zu was accepted", i);
        const char *e = qkv_error();
        if (!e || !strstr(e, cases[i].message) || !strstr(e, path))
            fail_msg("case %zu: expected \"%s\", got \"%s\"", i, cases[i].message,
                     e ? e : "(none)");
        qkv_clear_error();
    }
}

static void short_files_and_lengths_past_the_end_are_refused(void **state) {
    (void)state;
    write_bytes(path, "", 0);
    assert_null(qkv_safetensors_read(path));
    assert_error_contains("shorter than the 8-byte header length");
    write_bytes(path, "\x10\0\0\0\0\0\0\0{}", 10);
    assert_null(qkv_safetensors_read(path));
    assert_error_contains("header length 16 runs past the end of the file");
    write_bytes(path, "\xff\xff\xff\xff\xff\xff\xff\xff{}", 10);
    assert_null(qkv_safetensors_read(path));
    assert_error_contains("header length 18446744073709551615 runs past the end");
    assert_null(qkv_safetensors_read(dir));
    assert_error_contains("not a regular file");
    assert_null(qkv_safetensors_read("/nonexistent/x.safetensors"));
    assert_error_contains("/nonexistent/x.safetensors: No such file or directory");
}

static void a_flipped_data_byte_fails_the_checksum(void **state) {
    (void)state;
    qkv_linear *m = qkv_linear_new(3, 2, true, &(qkv_generator){0});
    assert_true(qkv_module_save(QKV_MODULE(m), path, NULL));
    FILE *f = fopen(path, "r+b");
    fseek(f, -3, SEEK_END);
    int c = fgetc(f);
    fseek(f, -3, SEEK_END);
    fputc(c ^ 0x10, f);
    fclose(f);
    assert_false(qkv_module_load(QKV_MODULE(m), path, NULL));
    assert_error_contains("checksum mismatch: the file is damaged");
    qkv_module_free(QKV_MODULE(m));
}

static unsigned char *read_bytes(const char *p, size_t *n) {
    FILE *f = fopen(p, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    rewind(f);
    unsigned char *buf = malloc(*n + 1);
    assert_int_equal(fread(buf, 1, *n, f), *n);
    fclose(f);
    return buf;
}

/* The file's every tensor (as raw bytes) and metadata value equal the reference's. */
static void assert_same_file(const qkv_safetensors *f, const qkv_safetensors *ref) {
    assert_int_equal(qkv_safetensors_count(f), qkv_safetensors_count(ref));
    for (int i = 0; i < qkv_safetensors_count(ref); i++) {
        const char *name = qkv_safetensors_name(ref, i);
        assert_string_equal(qkv_safetensors_name(f, i), name);
        assert_same_values(qkv_safetensors_tensor(f, name), qkv_safetensors_tensor(ref, name));
    }
    assert_int_equal(qkv_safetensors_meta_count(f), qkv_safetensors_meta_count(ref));
    for (int i = 0; i < qkv_safetensors_meta_count(ref); i++) {
        const char *key = qkv_safetensors_meta_key(ref, i);
        assert_string_equal(qkv_safetensors_meta(f, key), qkv_safetensors_meta(ref, key));
    }
}

/* The checksum covers the header as well as the data: whichever bit of a file qkv wrote is
 * flipped (the checksum's own key name included), the file is refused or reads the same. */
static void every_single_bit_flip_is_refused_or_reads_the_same(void **state) {
    (void)state;
    qkv_linear *m = qkv_linear_new(3, 2, true, &(qkv_generator){0});
    qkv_named_bytes bytes[] = {{"vocab", "abc", 3}};
    qkv_meta_pair meta[] = {{"dim", "3"}};
    qkv_checkpoint_contents x = {.n_bytes = 1, .bytes = bytes, .n_meta = 1, .meta = meta};
    assert_true(qkv_module_save(QKV_MODULE(m), path, &x));
    size_t n;
    unsigned char *good = read_bytes(path, &n);
    qkv_safetensors *ref = qkv_safetensors_from_bytes(good, n, "ref");
    assert_non_null(ref);
    int refused = 0;
    for (size_t bit = 0; bit < 8 * n; bit++) {
        good[bit / 8] ^= (unsigned char)(1u << bit % 8);
        write_bytes(path, good, n);
        good[bit / 8] ^= (unsigned char)(1u << bit % 8);
        qkv_scope_begin();
        qkv_safetensors *f = qkv_safetensors_read(path);
        if (!f) {
            const char *e = qkv_error();
            if (!e || !strstr(e, path)) fail_msg("bit %zu: refused with \"%s\"", bit, e);
            qkv_clear_error();
            refused++;
        } else {
            assert_same_file(f, ref);
            qkv_safetensors_free(f);
        }
        qkv_scope_end();
    }
    /* A CRC-32 sees every single-bit error, so in fact no flip gets through. */
    assert_int_equal(refused, 8 * n);
    qkv_safetensors_free(ref);
    free(good);
    qkv_module_free(QKV_MODULE(m));
}

/* A flip that turns "qkv.checksum" into another key would turn verification off, but the
 * file's qkv.format asks for the checksum. */
static void a_damaged_checksum_key_is_refused(void **state) {
    (void)state;
    qkv_linear *m = qkv_linear_new(3, 2, true, &(qkv_generator){0});
    assert_true(qkv_module_save(QKV_MODULE(m), path, NULL));
    size_t n;
    unsigned char *buf = read_bytes(path, &n);
    unsigned char *key = NULL;
    for (size_t i = 0; !key && i + 12 <= n; i++)
        if (!memcmp(buf + i, "qkv.checksum", 12)) key = buf + i;
    assert_non_null(key);
    key[4] ^= 0x01; /* "qkv.bhecksum" */
    write_bytes(path, buf, n);
    assert_false(qkv_module_load(QKV_MODULE(m), path, NULL));
    char want[256];
    snprintf(want, sizeof want,
             "qkv_safetensors_read: %s: qkv.format without qkv.checksum: the file is damaged",
             path);
    assert_string_equal(qkv_error(), want);
    qkv_clear_error();
    free(buf);
    qkv_module_free(QKV_MODULE(m));
}

/* Files written before the checksum covered the header (no qkv.format) still load, their
 * data checked as before. */
static void files_of_the_data_only_checksum_still_load(void **state) {
    (void)state;
    const char *header = "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                         "\"__metadata__\":{\"qkv.checksum\":\"crc32:aca16a6a\"}}";
    float one = 1.0f, two = 2.0f;
    write_raw(header, 4, &one);
    qkv_safetensors *f = qkv_safetensors_read(path);
    assert_non_null(f);
    assert_true(qkv_item(qkv_safetensors_tensor(f, "w")) == 1.0);
    qkv_safetensors_free(f);
    write_raw(header, 4, &two);
    assert_null(qkv_safetensors_read(path));
    assert_error_contains("checksum mismatch: the file is damaged");
}

static void bool_bytes_other_than_0_or_1_are_refused(void **state) {
    (void)state;
    write_raw("{\"m\":{\"dtype\":\"BOOL\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2, "\1\2");
    qkv_safetensors *f = qkv_safetensors_read(path);
    assert_non_null(f);
    assert_null(qkv_safetensors_tensor(f, "m"));
    assert_error_contains("BOOL tensor \"m\" holds a byte other than 0 or 1");
    qkv_safetensors_free(f);
}

static void other_writers_dtypes_read_as_qkv_dtypes(void **state) {
    (void)state;
    /* F16 1.5 and -2^-24 (subnormal), BF16 -3.0, I32 -7, U8 200, I16 -300 */
    const unsigned char data[] = {0x00, 0x3E, 0x01, 0x80, 0x40, 0xC0, 0xF9, 0xFF, 0xFF, 0xFF,
                                  200,  0xD4, 0xFE};
    write_raw("{\"h\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]},"
              "\"b\":{\"dtype\":\"BF16\",\"shape\":[],\"data_offsets\":[4,6]},"
              "\"i\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[6,10]},"
              "\"u\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[10,11]},"
              "\"s\":{\"dtype\":\"I16\",\"shape\":[1],\"data_offsets\":[11,13]}}",
              sizeof data, data);
    qkv_safetensors *f = qkv_safetensors_read(path);
    assert_non_null(f);
    qkv_tensor *h = qkv_safetensors_tensor(f, "h");
    assert_int_equal(h->dtype, QKV_F32);
    assert_true(qkv_get(h, (int64_t[]){0}) == 1.5);
    assert_true(qkv_get(h, (int64_t[]){1}) == -ldexp(1, -24));
    qkv_tensor *b = qkv_safetensors_tensor(f, "b");
    assert_int_equal(b->ndim, 0);
    assert_int_equal(b->dtype, QKV_BF16);
    assert_true(qkv_item(b) == -3.0);
    assert_true(qkv_item(qkv_safetensors_tensor(f, "i")) == -7.0);
    assert_int_equal(qkv_safetensors_tensor(f, "i")->dtype, QKV_I64);
    assert_true(qkv_item(qkv_safetensors_tensor(f, "u")) == 200.0);
    assert_true(qkv_item(qkv_safetensors_tensor(f, "s")) == -300.0);
    qkv_safetensors_free(f);
}

/* ---- Interrupted saves ------------------------------------------------------------------- */

static void a_failing_write_keeps_the_previous_checkpoint(void **state) {
    (void)state;
    qkv_transformer_encoder_layer *old = encoder_layer(1), *fresh = encoder_layer(2);
    qkv_transformer_encoder_layer *probe = encoder_layer(3);
    assert_true(qkv_module_save(QKV_MODULE(old), path, NULL));
    FILE *fp = fopen(path, "rb");
    fseek(fp, 0, SEEK_END);
    size_t size = (size_t)ftell(fp);
    fclose(fp);
    for (size_t cut = 1; cut < size; cut += cut < 64 ? 1 : 97) {
        qkv_debug_fail_write_after(cut);
        assert_false(qkv_module_save(QKV_MODULE(fresh), path, NULL));
        assert_error_contains("No space left on device");
        qkv_debug_fail_write_after(0);
        assert_true(qkv_module_load(QKV_MODULE(probe), path, NULL));
        assert_same_state(probe, old);
    }
    assert_true(qkv_module_save(QKV_MODULE(fresh), path, NULL));
    assert_true(qkv_module_load(QKV_MODULE(probe), path, NULL));
    assert_same_state(probe, fresh);
    qkv_module_free(QKV_MODULE(old));
    qkv_module_free(QKV_MODULE(fresh));
    qkv_module_free(QKV_MODULE(probe));
}

/* Sets the modification time of every file in dir other than model.safetensors to `age`
 * seconds ago (0: leaves it); returns how many there are. */
static int age_temporaries(int age) {
    int n = 0;
    DIR *d = opendir(dir);
    for (struct dirent *e; (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") ||
            !strcmp(e->d_name, "model.safetensors"))
            continue;
        char p[400];
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        struct timespec t[2] = {{time(NULL) - age, 0}, {time(NULL) - age, 0}};
        if (age) utimensat(AT_FDCWD, p, t, AT_SYMLINK_NOFOLLOW);
        n++;
    }
    closedir(d);
    return n;
}

/* An empty file in dir named name, modified `age` seconds ago. */
static void make_file(const char *name, int age) {
    char p[400];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    write_bytes(p, "", 0);
    struct timespec t[2] = {{time(NULL) - age, 0}, {time(NULL) - age, 0}};
    assert_int_equal(utimensat(AT_FDCWD, p, t, 0), 0);
}

static bool exists(const char *name) {
    char p[400];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return access(p, F_OK) == 0;
}

static void remove_file(const char *name) {
    char p[400];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    assert_int_equal(unlink(p), 0);
}

/* Temporary files of writers that were killed go at the next save into the directory; those
 * of a process still running, or changed in the last minute, stay. */
static void a_save_removes_only_the_temporary_files_of_killed_writers(void **state) {
    (void)state;
    pid_t dead = fork();
    if (dead == 0) _exit(0);
    waitpid(dead, NULL, 0);
    char stale1[64], stale2[64], stale3[64], fresh[64], live[64], mine[64];
    snprintf(stale1, sizeof stale1, "model.safetensors.tmp-%d-0", (int)dead);
    snprintf(stale2, sizeof stale2, "other.safetensors.tmp-%d-7", (int)dead);
    snprintf(stale3, sizeof stale3, ".qkv-%d-2.tmp", (int)dead);
    snprintf(fresh, sizeof fresh, "model.safetensors.tmp-%d-1", (int)dead);
    snprintf(live, sizeof live, "model.safetensors.tmp-%d-0", (int)getppid());
    snprintf(mine, sizeof mine, "model.safetensors.tmp-%d-0", (int)getpid());
    make_file(stale1, 120);
    make_file(stale2, 3600);
    make_file(stale3, 120);
    make_file(fresh, 10);
    make_file(live, 3600);
    make_file(mine, 3600);
    make_file("notes.tmp-x-1", 3600); /* not a name qkv gives */
    qkv_linear *m = qkv_linear_new(2, 1, false, &(qkv_generator){0});
    assert_true(qkv_module_save(QKV_MODULE(m), path, NULL));
    assert_false(exists(stale1) || exists(stale2) || exists(stale3));
    assert_true(exists(fresh) && exists(live) && exists(mine) && exists("notes.tmp-x-1"));
    remove_file(fresh);
    remove_file(live);
    remove_file(mine);
    remove_file("notes.tmp-x-1");
    qkv_module_free(QKV_MODULE(m));
}

/* A save to a symbolic link replaces its target and keeps the link, whether the target
 * exists or not yet. */
static void a_save_writes_through_a_symbolic_link(void **state) {
    (void)state;
    char link[400];
    snprintf(link, sizeof link, "%s/link.safetensors", dir);
    assert_int_equal(symlink("model.safetensors", link), 0);
    qkv_generator g;
    qkv_generator_init(&g, 1);
    qkv_linear *a = qkv_linear_new(2, 1, false, &g), *b = qkv_linear_new(2, 1, false, &g);
    for (int round = 0; round < 2; round++) { /* a dangling link, then one to a file */
        qkv_linear *m = round ? b : a;
        assert_true(qkv_module_save(QKV_MODULE(m), link, NULL));
        struct stat st;
        assert_int_equal(lstat(link, &st), 0);
        assert_true(S_ISLNK(st.st_mode));
        assert_int_equal(lstat(path, &st), 0);
        assert_true(S_ISREG(st.st_mode));
        qkv_linear *probe = qkv_linear_new(2, 1, false, &g);
        assert_true(qkv_module_load(QKV_MODULE(probe), path, NULL));
        assert_same_state(probe, m);
        qkv_module_free(QKV_MODULE(probe));
    }
    unlink(link);
    qkv_module_free(QKV_MODULE(a));
    qkv_module_free(QKV_MODULE(b));
}

/* A program checks its destination before the work whose result it saves. */
static void writable_names_a_missing_directory_a_directory_and_a_full_disk(void **state) {
    (void)state;
    assert_true(qkv_safetensors_writable(path, 4096));
    assert_int_equal(age_temporaries(0), 0); /* the probe is gone, and no file was made */
    assert_false(exists("model.safetensors"));
    char p[400], want[600];
    snprintf(p, sizeof p, "%s/missing/model.safetensors", dir);
    assert_false(qkv_safetensors_writable(p, 4096));
    snprintf(want, sizeof want, "qkv_safetensors_writable: %s: No such file or directory", p);
    assert_string_equal(qkv_error(), want);
    qkv_clear_error();
    assert_false(qkv_safetensors_writable(dir, 4096));
    snprintf(want, sizeof want, "qkv_safetensors_writable: %s: Is a directory", dir);
    assert_string_equal(qkv_error(), want);
    qkv_clear_error();
    qkv_debug_fail_write_after(1000); /* a disk with 1000 bytes left */
    assert_false(qkv_safetensors_writable(path, 4096));
    snprintf(want, sizeof want, "qkv_safetensors_writable: %s: No space left on device", path);
    assert_string_equal(qkv_error(), want);
    qkv_clear_error();
    assert_true(qkv_safetensors_writable(path, 100));
    qkv_debug_fail_write_after(0);
    assert_int_equal(age_temporaries(0), 0);
}

static void a_save_killed_at_any_moment_leaves_a_loadable_checkpoint(void **state) {
    (void)state;
    qkv_linear *a = qkv_linear_new(512, 512, true, &(qkv_generator){0});
    qkv_linear *probe = qkv_linear_new(512, 512, true, &(qkv_generator){0});
    qkv_fill_(a->weight, 0.0);
    assert_true(qkv_module_save(QKV_MODULE(a), path, NULL));
    struct timespec seed;
    clock_gettime(CLOCK_MONOTONIC, &seed);
    srand((unsigned)seed.tv_nsec);
    for (int round = 0; round < 8; round++) {
        pid_t child = fork();
        assert_true(child >= 0);
        if (child == 0) {
            /* rewrite the file forever, each version filled with one value */
            for (int v = 1;; v++) {
                qkv_fill_(a->weight, v);
                if (!qkv_module_save(QKV_MODULE(a), path, NULL)) _exit(1);
            }
        }
        usleep(2000 + (useconds_t)(rand() % 30000));
        kill(child, SIGKILL);
        int status;
        waitpid(child, &status, 0);
        assert_true(WIFSIGNALED(status));
        assert_true(qkv_module_load(QKV_MODULE(probe), path, NULL));
        /* whole: every weight holds the same value */
        double first = qkv_get(probe->weight, (int64_t[]){0, 0});
        double last = qkv_get(probe->weight, (int64_t[]){511, 511});
        assert_true(first == last);
        /* The killed child may leave its temporary file (it never replaces the checkpoint);
         * the next save removes it once it is a minute old. */
        age_temporaries(120);
        assert_true(qkv_module_save(QKV_MODULE(probe), path, NULL));
        assert_int_equal(age_temporaries(0), 0);
    }
    qkv_module_free(QKV_MODULE(a));
    qkv_module_free(QKV_MODULE(probe));
}

/* Whichever allocation fails while a checkpoint is read, the message says which file. */
static void a_failed_allocation_while_reading_names_the_file(void **state) {
    (void)state;
    qkv_transformer_encoder_layer *m = encoder_layer(1);
    assert_true(qkv_module_save(QKV_MODULE(m), path, NULL));
    char want[256];
    snprintf(want, sizeof want, "qkv_safetensors_read: %s: qkv: out of memory allocating ",
             path);
    for (uint64_t n = 1;; n++) {
        qkv_clear_error();
        qkv_debug_fail_alloc_at(n);
        qkv_safetensors *f = qkv_safetensors_read(path);
        bool failed = qkv_debug_alloc_count() >= n;
        qkv_debug_fail_alloc_at(0);
        if (!failed) {
            assert_non_null(f);
            qkv_safetensors_free(f);
            break;
        }
        assert_null(f);
        if (strncmp(qkv_error(), want, strlen(want)))
            fail_msg("allocation %llu: \"%s\"", (unsigned long long)n, qkv_error());
    }
    qkv_module_free(QKV_MODULE(m));
}

/* ---- Settings checked against the tensors ------------------------------------------------ */

static void parameter_count_is_that_of_the_model_built(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 1);
    classifier *m = classifier_new(&small, &g);
    assert_int_equal(classifier_parameter_count(&small),
                     qkv_module_num_parameters(QKV_MODULE(m)));
    qkv_module_free(QKV_MODULE(m));
}

/* The message for the file at path when the field at offset `field` of small is value. */
static void assert_config_refused(const qkv_safetensors *f, size_t field, int64_t value,
                                  const char *message) {
    classifier_config c = small;
    memcpy((char *)&c + field, &value, sizeof value);
    assert_false(classifier_config_fits(&c, f, path));
    char want[512];
    snprintf(want, sizeof want, "%s: %s", path, message);
    assert_string_equal(qkv_error(), want);
    qkv_clear_error();
}

/* A checkpoint's settings are checked against its tensors' shapes before a model is built by
 * them, so that a small file cannot make a loader allocate gigabytes. */
static void settings_that_disagree_with_the_tensors_are_refused(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 1);
    classifier *m = classifier_new(&small, &g);
    assert_true(qkv_module_save(QKV_MODULE(m), path, NULL));
    qkv_safetensors *f = qkv_safetensors_read(path);
    assert_true(classifier_config_fits(&small, f, path));
#define AT(field) offsetof(classifier_config, field)
    assert_config_refused(f, AT(ffn), 8388608, "setting ffn=8388608 disagrees with "
                          "\"encoder.layers.0.linear1.weight\", [16,8] in the file");
    assert_config_refused(f, AT(dim), 16, "setting dim=16 disagrees with "
                          "\"tok_embed.weight\", [20,8] in the file");
    assert_config_refused(f, AT(vocab_size), 1 << 30, "setting vocab_size=1073741824 "
                          "disagrees with \"tok_embed.weight\", [20,8] in the file");
    assert_config_refused(f, AT(max_len), 7, "setting max_len=7 disagrees with "
                          "\"pos_embed.weight\", [6,8] in the file");
    assert_config_refused(f, AT(n_classes), 4, "setting n_classes=4 disagrees with "
                          "\"head.weight\", [3,8] in the file");
    assert_config_refused(f, AT(layers), 1000000, "setting layers=1000000 disagrees with the "
                          "1 encoder layers in the file");
    assert_config_refused(f, AT(heads), 3, "setting heads=3 does not divide dim=8");
#undef AT
    qkv_safetensors_free(f);

    /* Only the tensors the sizes are read from: the settings ask for far more parameters. */
    char *keep[] = {"tok_embed.weight", "pos_embed.weight", "head.weight",
                    "encoder.layers.0.linear1.weight"};
    qkv_tensor *kept[] = {m->tok_embed->weight, m->pos_embed->table, m->head->weight,
                          m->encoder->layers[0]->linear1->weight};
    qkv_named_list few = {4, keep, kept};
    assert_true(qkv_safetensors_write(path, &few, NULL));
    f = qkv_safetensors_read(path);
    assert_false(classifier_config_fits(&small, f, path));
    char want[256];
    snprintf(want, sizeof want, "%s: the settings describe a model of %lld parameters, more "
             "than the 360 values in the file", path,
             (long long)classifier_parameter_count(&small));
    assert_string_equal(qkv_error(), want);
    qkv_clear_error();
    qkv_safetensors_free(f);
    qkv_module_free(QKV_MODULE(m));
}

/* ---- Allocation failures ------------------------------------------------------------------ */

static void save_and_load_survive_every_allocation_failure(void **state) {
    (void)state;
    qkv_transformer_encoder_layer *a = encoder_layer(1), *b = encoder_layer(2);
    qkv_named_bytes bytes[] = {{"vocab", "abc", 3}};
    qkv_meta_pair meta[] = {{"k", "v"}};
    qkv_checkpoint_contents x = {.n_bytes = 1, .bytes = bytes, .n_meta = 1, .meta = meta};
    assert_true(qkv_module_save(QKV_MODULE(a), path, &x));
    for (int op = 0; op < 2; op++) {
        if (op == 0)
            assert_every_allocation_failure_is_clean(qkv_module_save(QKV_MODULE(b), path, &x));
        else
            assert_every_allocation_failure_is_clean(qkv_module_load(QKV_MODULE(b), path, NULL));
        /* whichever save failed, the file is one whole checkpoint */
        qkv_transformer_encoder_layer *probe = encoder_layer(3);
        assert_true(qkv_module_load(QKV_MODULE(probe), path, NULL));
        assert_same_state(probe, b);
        qkv_module_free(QKV_MODULE(probe));
    }
    qkv_module_free(QKV_MODULE(a));
    qkv_module_free(QKV_MODULE(b));
}

static void training_checkpoints_survive_every_allocation_failure(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 5);
    classifier *m = classifier_new(&small, &g);
    qkv_optimizer *opt = adam_for(m);
    train_step(m, opt, 0);
    assert_every_allocation_failure_is_clean(qkv_checkpoint_save(QKV_MODULE(m), opt, path, NULL));
    assert_every_allocation_failure_is_clean(qkv_checkpoint_load(QKV_MODULE(m), opt, path, NULL));
    qkv_clear_error();
    qkv_optimizer_free(opt);
    qkv_module_free(QKV_MODULE(m));
}

/* ---- PyTorch interop ---------------------------------------------------------------------- */

static void pytorch_checkpoint_gives_pytorch_logits(void **state) {
    (void)state;
    qkv_safetensors *f =
        qkv_safetensors_read(QKV_FIXTURES "/data/torch_classifier.safetensors");
    assert_non_null(f);
    classifier_config c = {.vocab_size = 50, .n_classes = 3, .max_len = 8, .dim = 16,
                           .heads = 2, .layers = 2, .ffn = 32, .dropout = 0};
    qkv_generator g;
    qkv_generator_init(&g, 0);
    classifier *m = classifier_new(&c, &g);
    assert_non_null(m);
    /* strict: every name matches */
    assert_true(qkv_module_load_safetensors(QKV_MODULE(m), f, NULL));
    qkv_module_train(QKV_MODULE(m), false);
    qkv_tensor *logits = classifier_forward(m, qkv_safetensors_tensor(f, "test.ids"),
                                            qkv_safetensors_tensor(f, "test.pad"));
    qkv_tensor *want = qkv_safetensors_tensor(f, "test.logits");
    assert_non_null(logits);
    assert_int_equal(logits->numel, 12);
    for (int64_t i = 0; i < 4; i++)
        for (int64_t k = 0; k < 3; k++) {
            double x = qkv_get(logits, (int64_t[]){i, k}), y = qkv_get(want, (int64_t[]){i, k});
            assert_true(fabs(x - y) <= 1e-5 * fabs(y) + 1e-6);
        }
    qkv_safetensors_free(f);
    qkv_module_free(QKV_MODULE(m));
}

#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)

int main(void) {
    const struct CMUnitTest tests[] = {
        T(save_then_load_restores_every_parameter),
        T(extras_round_trip_tensors_bytes_and_metadata),
        T(saved_file_is_plain_safetensors),
        T(load_converts_between_float_dtypes),
        T(load_shape_mismatch_names_it_and_changes_nothing),
        T(load_dtype_mismatch_is_an_error),
        T(missing_and_unexpected_names_fail_unless_partial),
        T(save_refuses_bad_and_duplicate_names),
        T(training_resumed_from_a_checkpoint_is_bitwise_identical),
        T(empty_tensors_at_a_shared_offset_round_trip),
        T(save_refuses_repeated_metadata_and_reserved_names),
        T(a_save_keeps_the_mode_of_the_file_it_replaces),
        T(a_module_only_file_given_an_optimizer_changes_nothing),
        T(hostile_headers_are_refused_with_a_message),
        T(short_files_and_lengths_past_the_end_are_refused),
        T(a_flipped_data_byte_fails_the_checksum),
        T(every_single_bit_flip_is_refused_or_reads_the_same),
        T(a_damaged_checksum_key_is_refused),
        T(files_of_the_data_only_checksum_still_load),
        T(bool_bytes_other_than_0_or_1_are_refused),
        T(other_writers_dtypes_read_as_qkv_dtypes),
        T(a_failing_write_keeps_the_previous_checkpoint),
        T(a_save_killed_at_any_moment_leaves_a_loadable_checkpoint),
        T(a_save_removes_only_the_temporary_files_of_killed_writers),
        T(a_save_writes_through_a_symbolic_link),
        T(writable_names_a_missing_directory_a_directory_and_a_full_disk),
        T(a_failed_allocation_while_reading_names_the_file),
        T(parameter_count_is_that_of_the_model_built),
        T(settings_that_disagree_with_the_tensors_are_refused),
        T(save_and_load_survive_every_allocation_failure),
        T(training_checkpoints_survive_every_allocation_failure),
        T(pytorch_checkpoint_gives_pytorch_logits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
