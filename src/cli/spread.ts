/** `count` integers spread evenly over [0, total), the first and the last included (all of them when fewer). */
export function spreadEvenly(total: number, count: number): number[] {
  if (total <= count) return Array.from({ length: total }, (_, i) => i);
  if (count <= 1) return count === 1 ? [0] : [];
  const out = new Set<number>();
  for (let i = 0; i < count; i++) out.add(Math.round((i * (total - 1)) / (count - 1)));
  return [...out];
}
