/// The text tables `softdev bench` prints: a header, then one line per row, the first `left`
/// columns left-aligned and the others right-aligned, and a first cell that repeats the one
/// above left blank (a workload's rows read as a group).
enum BenchmarkTable {
    static func render(_ header: [String], _ rows: [[String]], widths: [Int], left: Int = 2) -> String {
        func pad(_ cells: [String]) -> String {
            zip(cells, widths).enumerated().map { i, pair in
                let space = String(repeating: " ", count: max(0, pair.1 - pair.0.count))
                return i < left ? pair.0 + space : space + pair.0
            }.joined(separator: " ")
        }
        var lines = [pad(header)]
        var last = ""
        for row in rows {
            var cells = row
            if cells.first == last { cells[0] = "" } else { last = cells.first ?? "" }
            lines.append(pad(cells))
        }
        return lines.joined(separator: "\n")
    }
}
