/* The linear kernels' split of a layer's rows over threads: tasks of ROWS_PER_TASK rows spread
 * over OpenMP threads (the runtime torch already loaded, by soname), when built with OpenMP and
 * there is more than one thread and one task. Each kernel takes passes of up to MAX_M positions. */
#ifndef STABLELM_LSP_TASKS_H
#define STABLELM_LSP_TASKS_H

#ifdef _OPENMP
#define PARALLEL_FOR _Pragma("omp parallel for num_threads(threads) schedule(static) if (threads > 1 && tasks > 1)")
#else
#define PARALLEL_FOR
#endif

#define MAX_M 16
#define ROWS_PER_TASK 32

#endif
